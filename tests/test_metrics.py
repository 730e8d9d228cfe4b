"""Worker figures merged for /metrics: pipeline stages summed, tensor ranks of a stage counted once."""

from steer_plugin.metrics import WorkerStatsCollector


def snapshot(pp: int, tp: int, tokens: int, rejected: int = 0) -> dict:
    return {
        "ranks": {"pp": pp, "tp": tp},
        "steered_tokens": {"add": tokens},
        "features_applied": {},
        "op_seconds": 1.0,
        "sae_bytes": {},  # equal on stages that own no SAE: must not be taken for tensor copies
        "l0": {},
        "reconstruction_error": {},
        "rejected_messages": {"steering": rejected},
        "step_errors": 0,
    }


def test_pipeline_stages_are_summed_and_tensor_copies_counted_once():
    collector = WorkerStatsCollector()
    collector.update([snapshot(0, 0, 5, 1), snapshot(0, 1, 5, 1), snapshot(1, 0, 7, 2), snapshot(1, 1, 7, 2)])
    assert collector.snapshot["steered_tokens"] == {"add": 12}
    assert collector.snapshot["rejected_messages"] == {"steering": 3}
    assert collector.snapshot["op_seconds"] == 2.0
    collector.update([snapshot(0, 0, 5), snapshot(1, 0, 7)])  # PP=2 with equal (empty) SAE bytes
    assert collector.snapshot["steered_tokens"] == {"add": 12}
