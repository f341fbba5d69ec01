"""Connecting to Ray: an existing cluster (config, $RAY_ADDRESS under `ray job submit`, or
`ray up`'s head) or a local single-node Ray started for this process."""

from __future__ import annotations

import os

# what every Ray worker of ours runs with; `lorafleet submit` puts the same into its job's
# runtime env, since a job's driver may not add env vars of its own (Ray refuses the merge)
WORKER_ENV_VARS = {
    "TOKENIZERS_PARALLELISM": "false",
    # Train V2 tees worker print() to stdout and to its logger: each line came out twice
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
}
# set by Ray in the driver of a submitted job (`ray job submit`, `lorafleet submit`)
IN_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
# the State API (dashboard) of the local Ray this process started; None until it starts one
_local_state_api: str | None = None
# the Serve HTTP mode (cluster/serve_config.SERVE_MODES) the local Ray of this process started in
_local_serve_mode: str | None = None


def state_api_address() -> str | None:
    """The State API of the local Ray this process started, for `ray.util.state` calls: with
    several local Rays on one machine, Ray cannot guess which one is ours. None when this process
    joined a cluster (then Ray finds it from the address)."""
    return _local_state_api


def ensure_ray(ray_cfg=None, log=print, serve_mode: str | None = None):
    """ray.init() once; returns the ray module. Never stops a cluster it did not start.

    A local Ray starts in `serve_mode` (default: `http.mode`'s default), whoever starts it: Ray
    Serve reads its mode from the environment at import in every Serve process, so the mode is
    fixed when Ray's processes start (a demo trains first, then serves on the same Ray)."""
    import ray

    if ray.is_initialized():
        if serve_mode and _local_serve_mode and serve_mode != _local_serve_mode:
            log(
                f"[ray] http.mode {serve_mode!r} does not apply: this process started Ray in "
                f"{_local_serve_mode!r} mode earlier, and Serve's mode is fixed when Ray starts"
            )
        return ray
    address = getattr(ray_cfg, "address", None) or os.environ.get("RAY_ADDRESS")
    # workers import our packages from the working directory; jobs already ship it
    env = {"env_vars": dict(WORKER_ENV_VARS)}
    if address:
        log(f"[ray] connecting to {address}")
        # a State API named by the caller is the workers' too (Train's placement-group cleaner
        # looks it up; with several Rays on one machine it cannot guess)
        if os.environ.get("RAY_API_SERVER_ADDRESS"):
            env["env_vars"]["RAY_API_SERVER_ADDRESS"] = os.environ["RAY_API_SERVER_ADDRESS"]
        if serve_mode:
            log(
                f"[ray] http.mode {serve_mode!r} applies to a Ray lorafleet starts; a running "
                "cluster serves in the mode its `ray start` environment set (see cluster.yaml)"
            )
        ray.init(
            address=address,
            runtime_env=env if IN_JOB_ENV not in os.environ else None,
            log_to_driver=True,
        )
    else:
        num_cpus = getattr(ray_cfg, "num_cpus", None)
        log(f"[ray] starting a local Ray ({num_cpus or 'all'} logical CPUs)")
        # the dashboard serves the State API that Train's placement-group cleaner polls;
        # without it that cleaner warns every few seconds
        # address="local": a new Ray of our own, even when another local one is running (a plain
        # ray.init() would join it, and our Serve app or shutdown would land in someone else's)
        _stay_on_loopback()
        env["env_vars"].update(_set_serve_mode(serve_mode))
        # Train's placement-group cleaner finds the State API by looking for "the" local Ray; with
        # several on the machine it fails, dies, and the groups of stopped Tune trials stay
        # reserved until the search hangs for resources. Tell its processes which dashboard is ours.
        global _local_state_api
        dashboard_port = _free_port()
        _local_state_api = f"http://127.0.0.1:{dashboard_port}"
        env["env_vars"]["RAY_API_SERVER_ADDRESS"] = _local_state_api
        env["env_vars"].update(_local_train_env())
        ray.init(
            address="local",
            num_cpus=num_cpus,
            dashboard_host="127.0.0.1",
            dashboard_port=dashboard_port,
            _node_ip_address="127.0.0.1",
            runtime_env=env,
        )
    return ray


# Ray Train's preemption watcher (one more actor process per run, polling every 5 s) waits for
# an autoscaler to drain a node, so a run can checkpoint before a spot node is reclaimed. A local
# Ray lorafleet starts is one machine that nothing drains: the watcher is off there, unless the
# user set this variable. On a cluster (`ray.address`, `ray job submit`) Ray's default stays on.
PREEMPTION_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"


def _local_train_env() -> dict[str, str]:
    """Ray Train settings for a local Ray, put into this process's environment too (the raylet,
    and so every job that joins this Ray later, inherits it)."""
    values = {PREEMPTION_WATCHER_ENV: os.environ.get(PREEMPTION_WATCHER_ENV, "0")}
    os.environ.update(values)
    return values


def _set_serve_mode(mode: str | None) -> dict[str, str]:
    """Put Serve's mode into this process's environment (the raylet and every worker inherit it)
    and return its variables; variables of the other modes are set off, not left to chance."""
    from cluster.config.serve import SERVE_MODES, HttpConfig

    global _local_serve_mode
    _local_serve_mode = mode or HttpConfig.model_fields["mode"].default
    wanted = SERVE_MODES[_local_serve_mode]
    names = {k for env in SERVE_MODES.values() for k in env}
    values = {k: wanted.get(k, "0") for k in sorted(names)}
    if _local_serve_mode == "haproxy":
        # HAProxy's stats and metrics ports are fixed (8404, 9101) unless set: a second local
        # Ray in this mode (another app, a test worker) would fail to start its HAProxy
        for var in ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT"):
            values[var] = os.environ.get(var) or str(_free_port())
    os.environ.update(values)
    return values


def _stay_on_loopback() -> None:
    """A local Ray takes this machine's outward address as its node IP, even when given
    127.0.0.1 (ray.init resolves loopback to the outward address), and binds workers, the object
    store and Serve's replicas there. Ray's own switch for single-machine use (on by default on
    macOS and Windows) keeps it on 127.0.0.1: set it for this process and the ones Ray starts.
    It is read at `import ray`, hence the module attribute too (the one private Ray name that
    cluster/ touches; checked against Ray 2.60)."""
    import ray

    from cluster.ray_version import check_ray_version, require

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    check_ray_version(who="lorafleet's local Ray")
    from ray._private import ray_constants

    require(
        ray_constants, ("ENABLE_RAY_CLUSTER",), "ray._private.ray_constants", "Ray", ray.__version__
    )
    ray_constants.ENABLE_RAY_CLUSTER = False


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_local_ray(grace_s: float = 15.0) -> list[int]:
    """Shut down the local Ray this process started, and leave none of its processes behind.

    `ray.shutdown()` stops the head's processes by SIGTERM and returns; the raylet's agents
    (runtime env, dashboard) exit on their own when they notice their raylet is gone, which on
    a loaded machine took over a minute. Every child of this process is one this command
    started, so the ones still running `grace_s` after the shutdown are killed by PID. Returns
    the PIDs it had to kill."""
    import sys

    import psutil

    ours = psutil.Process().children(recursive=True)
    sys.modules["ray"].shutdown()
    _, alive = psutil.wait_procs(ours, timeout=grace_s)
    killed = []
    for proc in alive:
        try:
            proc.kill()
            killed.append(proc.pid)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)
    return killed


def mode_of(env: dict[str, str | None]) -> str:
    """The Serve HTTP mode (SERVE_MODES) that a process with Serve's variables `env` runs in."""
    from cluster.config.serve import SERVE_MODES

    for mode in ("haproxy", "throughput"):  # the one that sets the most, first
        if all(env.get(k) == v for k, v in SERVE_MODES[mode].items()):
            return mode
    return "proxy"


def running_serve_mode(timeout_s: float = 60.0) -> str:
    """The Serve HTTP mode the Ray this process is connected to actually runs in, not what a
    YAML says: the mode this process started its local Ray in, else the one the cluster's own
    processes run in. Serve reads it from each Ray process's environment, which a cluster's
    nodes get from their `ray start` (cluster.yaml exports HAProxy's): a zero-CPU task on each
    alive node reads it there, and the most exposed mode found is the answer (HAProxy on any
    node binds that node's replica ports on all interfaces)."""
    import ray

    from cluster.config.serve import SERVE_MODES

    if _local_serve_mode is not None:
        return _local_serve_mode
    names = sorted({k for env in SERVE_MODES.values() for k in env})
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    @ray.remote(num_cpus=0)
    def serve_env() -> dict:
        return {k: os.environ.get(k) for k in names}

    calls = [
        serve_env.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
        ).remote()
        for n in ray.nodes()
        if n.get("Alive")
    ]
    try:
        modes = {mode_of(env) for env in ray.get(calls, timeout=timeout_s)}
    except ray.exceptions.GetTimeoutError:
        from cluster.errors import LorafleetError

        raise LorafleetError(
            f"cannot read the Serve mode the cluster's {len(calls)} node(s) run in: a zero-CPU "
            f"task did not answer within {timeout_s:g} s"
        ) from None
    return next(m for m in ("haproxy", "throughput", "proxy") if m in modes)
