"""Multi-node TP=2 (test_multi_node's two namespaced hosts, one tensor-parallel rank each) with the tiny Llama of
test_tensor_parallel: steered and unsteered outputs equal a single-node TP=1 engine's, and runtime loads reach
both hosts' ranks and roll back when one host's rank refuses. A separate module from the PP=2 checks so that
only one two-node server runs at a time."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from .conftest import inprocess_engine
from .plain_engines import TOP
from .test_multi_node import ADMIN, completions, multi_node_server, node_dirs, post
from .test_tensor_parallel import LOGPROB_TOL, MAX_TOKENS, PROMPT_TEXTS, run_batch, steerings
from .tiny_models import SAE_LAYER, TinyModel, build_all

pytestmark = [pytest.mark.server, pytest.mark.netns]

ARCH = "LlamaForCausalLM"


@pytest.fixture(scope="module")
def tiny(demo_assets, tmp_path_factory) -> TinyModel:
    return build_all(tmp_path_factory.mktemp("tiny-mn"), demo_assets.model_dir, (ARCH,))[ARCH]


@pytest.fixture(scope="module")
def tiny_assets(tiny):
    from steer_plugin.catalog import load_assets
    from steer_plugin.config import load_config_file

    return load_assets(load_config_file(str(tiny.config_path)))


@pytest.fixture(scope="module")
def prompts(demo_assets) -> list[list[int]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(demo_assets.model_dir))
    return [[1, *tokenizer(text)["input_ids"]] for text in PROMPT_TEXTS]


def with_nan(sae_dir: Path) -> None:
    """One NaN in W_dec, the safetensors header intact (the API, which reads headers only, accepts it)."""
    weights = sae_dir / "sae_weights.safetensors"
    tensors = load_file(str(weights))
    tensors["W_dec"][3, 1] = float("nan")
    save_file(tensors, str(weights))


def grown(sae_dir: Path, extra: int) -> None:
    """The SAE with `extra` more features (valid files, a larger d_sae): more rows than a layer reserves."""
    weights = sae_dir / "sae_weights.safetensors"
    t = load_file(str(weights))
    g = torch.Generator().manual_seed(3)
    t["W_enc"] = torch.cat([t["W_enc"], torch.randn(t["W_enc"].shape[0], extra, generator=g) * 0.3], dim=1)
    t["W_dec"] = torch.cat([t["W_dec"], torch.randn(extra, t["W_dec"].shape[1], generator=g) * 0.3])
    t["b_enc"] = torch.cat([t["b_enc"], torch.zeros(extra)])
    save_file(t, str(weights))
    cfg = json.loads((sae_dir / "cfg.json").read_text())
    cfg["d_sae"] += extra
    (sae_dir / "cfg.json").write_text(json.dumps(cfg))


def test_tp2_across_hosts_equals_one_rank_and_runtime_loads_roll_back(
    hosts, tiny, tiny_assets, prompts, tmp_path_factory
):
    started = time.time()
    with inprocess_engine(str(tiny.model_dir), str(tiny.config_path)) as llm:
        one_tokens, one_logprobs, _ = run_batch(llm, tiny_assets, prompts, inspect=False)
    print(f"single-node TP=1 reference: {time.time() - started:.1f} s")

    config = json.loads(tiny.config_path.read_text())
    config["saes"][0]["path"] = "/tmp/tiny-sae"
    config["vectors"][0]["path"] = "/tmp/unit.safetensors"
    d_sae = tiny_assets.saes["tiny"].sae.d_sae
    config["runtime"] = {"layers": [SAE_LAYER], "rows_per_layer": d_sae + 4, "roots": ["/tmp/runtime"]}
    files = {
        "tiny-sae": tiny.sae_dir,
        "unit.safetensors": Path(config_vector(tiny)),
        "model": tiny.model_dir,
        "runtime/good": tiny.sae_dir,
        "runtime/bad": tiny.sae_dir,  # host 1's copy gets a NaN below
        "runtime/big": tiny.sae_dir,  # host 1's copy gets more features than the layer reserves
    }
    dirs = node_dirs(tmp_path_factory, "tp", config, files)
    with_nan(dirs[1] / "runtime" / "bad")
    grown(dirs[1] / "runtime" / "big", extra=8)
    log_dir = tmp_path_factory.mktemp("tp-logs")
    with multi_node_server(hosts, dirs, "/tmp/model", ["--tensor-parallel-size", "2"], log_dir) as pool:
        bodies = [
            {
                "prompt": ids,
                "max_tokens": MAX_TOKENS,
                "logprobs": TOP,
                "return_tokens_as_token_ids": True,
                "return_token_ids": True,
                **({"steering": steering} if steering else {}),
            }
            for ids, steering in zip(prompts, steerings())
        ]
        replies = completions(pool, hosts, bodies)
        two_tokens = [r["choices"][0]["token_ids"] for r in replies]
        two_logprobs = [
            {int(t.split(":", 1)[1]): v for t, v in r["choices"][0]["logprobs"]["top_logprobs"][0].items()}
            for r in replies
        ]
        assert two_tokens == one_tokens
        errors = [
            max(abs(lp - one[t]) for t, lp in two.items() if t in one)
            for one, two in zip(one_logprobs, two_logprobs)
        ]
        print(f"two-node TP=2 vs TP=1 max |Δ logprob| per request: {[f'{e:.1e}' for e in errors]}")
        assert max(errors) < LOGPROB_TOL

        # Host 1's rank refuses its copies; the API (which read host 0's headers) answers with its refusal, and no
        # rank keeps anything: the NaN copy fails while the files are read (staged) everywhere, the grown copy
        # only when its rows are placed, after host 0's rank placed its own: that one is unloaded again.
        for sae_id, status, message in (("bad", 400, "non-finite"), ("big", 507, "rows_per_layer")):
            refused = post(
                pool, hosts, "/v1/steering/saes", {"id": sae_id, "path": f"/tmp/runtime/{sae_id}"}, ADMIN
            )
            assert refused.status_code == status and message in refused.text, refused.text
            unknown = post(
                pool, hosts, "/v1/completions",
                {"model": "demo", "prompt": prompts[1], "max_tokens": 1,
                 "steering": {"features": [{"sae": sae_id, "index": 5, "op": "add", "value": 8.0}]}},
            )  # fmt: skip
            assert unknown.status_code == 400, unknown.text
        # Only one runtime SAE fits a layer's reserved rows: this load finds them free on both ranks.
        loaded = post(pool, hosts, "/v1/steering/saes", {"id": "good", "path": "/tmp/runtime/good"}, ADMIN)
        assert loaded.status_code == 201, loaded.text
        add = {"features": [{"sae": "tiny", "index": 5, "op": "add", "value": 8.0}]}
        runtime = {"features": [{**add["features"][0], "sae": "good"}]}
        configured_reply, runtime_reply = completions(
            pool, hosts, [{**bodies[1], "steering": add}, {**bodies[1], "steering": runtime}]
        )
        assert (
            runtime_reply["choices"][0]["token_ids"]
            == configured_reply["choices"][0]["token_ids"]
            == one_tokens[1]
        )
        assert runtime_reply["choices"][0]["logprobs"]["top_logprobs"][0] == pytest.approx(
            configured_reply["choices"][0]["logprobs"]["top_logprobs"][0], abs=1e-5
        )
    print(f"TP=2 two-node test: {time.time() - started:.1f} s")


def config_vector(tiny: TinyModel) -> str:
    return json.loads(tiny.config_path.read_text())["vectors"][0]["path"]
