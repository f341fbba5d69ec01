"""What tests share beyond fixtures: `toolbox` (free ports, stopping what a test started, asking
a cluster from a process of its own, the S3 server on loopback), and two scripts run by path,
`vllm_lora.py` and `loopback_only.sh`."""
