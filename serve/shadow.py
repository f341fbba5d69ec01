"""What a release checks before any user sees its candidate, inside the ingress replica:

- the eval gate (`release.eval`): the replica that took the start scores the control and the
  candidate on held-out rows, greedy, through the same path a request takes (the version's
  prompt format, its engine), by `lorafleet eval`'s metrics (cluster.text.scoring), and reports
  both scores to the ReleaseManager (`Releases.eval_result`, which decides);
- the shadow step (`release.shadow`): a share of the control's requests is also sent to the
  candidate after the control has answered; its answer is discarded, its errors and latency are
  counted for the release's gates, and whether it agreed with the control's (exact text, for
  answers that were not streamed) is counted beside them. A shadow failure is only counted: the
  user's request has already been answered.

A mixin of the ingress replica (serve/ingress.py).
"""

from __future__ import annotations

import asyncio
import time

from cluster.store import storage
from cluster.text.scoring import score_answers
from serve.answer import _ENGINE_CALLS
from serve.auth import ApiError
from serve.ray_internal import CompletionRequest

MAX_SHADOWS = 32  # mirrored requests in flight per replica; more are skipped, not queued
EVAL_CLIENTS = 8  # rows scored at once
MANAGER_TRIES = 30  # the manager restarting: tell it the scores for up to ~30 s


def answer_text(content: dict | None) -> str | None:
    """The text of an OpenAI answer's first choice (a completion's or a chat message's)."""
    choices = (content or {}).get("choices") or []
    if not choices:
        return None
    first = choices[0]
    if first.get("text") is not None:
        return first["text"]
    return (first.get("message") or {}).get("content")


def _ignore(*_args) -> None:
    return None


class ShadowMixin:
    """Needs from the ingress: cfg, rng, releases, release_counts, release, bases, store,
    background (a set of tasks), _check_target, _fits, _render_prompt, _first_chunk,
    _record_release."""

    # --- the shadow step ----------------------------------------------------------------------

    def _shadow_copy(self, body, release: tuple[str, str] | None):
        """A copy of `body` for the candidate, when this control answer is one the release's
        shadow step mirrors (its percent, drawn per request); else None. Taken before the
        prompt is rendered: the candidate's own prompt format renders it."""
        if not release or release[1] != "control":
            return None
        rel = self.releases.get(release[0])
        if rel is None or rel[3] <= 0 or len(self.background) >= MAX_SHADOWS:
            return None
        if self.rng.random() * 100 >= rel[3]:
            return None
        copy = body.model_copy(deep=True)
        copy.model = f"{body.model.partition(':')[0]}:{release[0]}@{rel[1]}"
        copy.stream, copy.stream_options = False, None
        return copy

    def _mirror(self, shadow, call_method: str, adapter: str, control: dict | None) -> None:
        """Send the mirrored request in the background; `control` is the control's answer (None
        for a stream: then only errors and latency are compared)."""
        if shadow is None:
            return
        text = answer_text(control)
        task = asyncio.get_running_loop().create_task(
            self._shadow_answer(shadow, call_method, adapter, text)
        )
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    async def _engine_answer(self, body, call_method: str) -> dict:
        """The whole answer to `body` (a pinned `model:adapter@version`, not streamed), its
        prompt rendered as that version was trained; ApiError as a request would get it."""
        body.model = await self._check_target(body.model)
        await self._render_prompt(body, call_method)
        _, head, _ = await self._first_chunk(body, call_method, None, _ignore)
        return head.model_dump()

    async def _shadow_answer(self, body, call_method: str, adapter: str, control: str | None):
        _ENGINE_CALLS.set([])  # its own: a user's 504 must not cancel it, nor it theirs
        t0, ok, content = time.perf_counter(), False, None
        try:
            async with asyncio.timeout(self.cfg.http.request_timeout_s):
                content = await self._engine_answer(body, call_method)
            ok = True
        except Exception as e:  # counted as the candidate's error; the user was answered
            print(f"[ingress] shadow answer of {body.model} failed: {type(e).__name__}: {e}")
        # "shadow": the manager counts these only while the shadow step lasts
        self._record_release((adapter, "shadow"), ok, time.perf_counter() - t0)
        if ok and control is not None:
            c = self.release_counts.setdefault(adapter, {}).setdefault("shadow", {})
            c["compared"] = c.get("compared", 0) + 1
            c["agreed"] = c.get("agreed", 0) + int(answer_text(content) == control)

    # --- the eval gate ------------------------------------------------------------------------

    async def _eval_rows(self, spec) -> list[dict] | None:
        """The held-out rows of a release start's `eval` (None without one, or when the spec is
        invalid: the manager names its problems); 400 for a file that cannot be read or parsed,
        before anything starts."""
        from cluster.config.release import EvalGateConfig
        from serve.eval import parse_rows

        raw = spec.get("eval") if isinstance(spec, dict) else None
        try:
            ev = EvalGateConfig.model_validate(raw) if raw is not None else None
        except ValueError:
            return None
        if ev is None:
            return None
        try:
            text = await asyncio.to_thread(storage.read_text, ev.path)
            return parse_rows(text.splitlines(), ev.path, ev.max_rows)
        except (OSError, ValueError) as e:
            raise ApiError(400, f"release.eval.path: {e}", param="eval.path") from None

    async def _eval_model(self, adapter: str, version: str, model: str | None) -> str:
        if model is not None:
            if model not in self.bases:
                raise ValueError(
                    f"release.eval.model {model!r} is not served: {sorted(self.bases)}"
                )
            return model
        served = await self.store.get(adapter, version)
        fits = [m for m in self.bases if served is None or self._fits(served, m)]
        if not fits:
            raise ValueError(f"no served model fits {adapter!r} {version}")
        return fits[0]

    async def _score(self, model: str, adapter: str, version: str, rows, ev: dict) -> float:
        """`ev['metric']` of `adapter@version` on `rows`, greedy, EVAL_CLIENTS at a time."""
        gate = asyncio.Semaphore(EVAL_CLIENTS)

        async def ask(row) -> str:
            body = CompletionRequest(
                model=f"{model}:{adapter}@{version}",
                prompt=row["prompt"],
                max_tokens=ev["max_tokens"],
                temperature=0,
            )
            async with gate:
                return answer_text(await self._engine_answer(body, "completions")) or ""

        answers = await asyncio.gather(*(ask(r) for r in rows))
        return score_answers(list(answers), [r["completion"] for r in rows])[ev["metric"]]

    def _start_eval(self, status: dict, rows: list[dict]) -> None:
        task = asyncio.get_running_loop().create_task(self._run_eval(status, rows))
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    async def _run_eval(self, status: dict, rows: list[dict]) -> None:
        """Score both versions and tell the manager: {metric, control, candidate, rows}, or
        {error} (a version that cannot answer, the timeout)."""
        _ENGINE_CALLS.set([])
        ev, adapter = status["spec"]["eval"], status["adapter"]
        print(
            f"[release] {adapter}: scoring {status['candidate']} and {status['control']} on {len(rows)} rows"
        )
        try:
            async with asyncio.timeout(ev["timeout_s"]):
                model = await self._eval_model(adapter, status["candidate"], ev.get("model"))
                result = {"metric": ev["metric"], "rows": len(rows)}
                for arm in ("control", "candidate"):
                    result[arm] = await self._score(model, adapter, status[arm], rows, ev)
        except TimeoutError:
            result = {"error": f"no scores within {ev['timeout_s']:g} s (release.eval.timeout_s)"}
        except Exception as e:  # ApiError (a version vLLM cannot load, ...), a bad model
            result = {"error": f"{getattr(e, 'message', None) or e}"}
        for _ in range(MANAGER_TRIES):
            try:
                await self.release.eval_result.remote(adapter, status["candidate"], result)
                return
            except Exception as e:  # the manager restarting
                print(f"[release] {adapter}: cannot report the eval yet: {e!r}")
                await asyncio.sleep(1.0)
