"""The text routing explorer, driven headless through its controls (the browser test drives the
same widget in JupyterLab): each control re-routes the chosen layer's logits and the reported
stats follow the routing reference."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from routerlib import RouterConfig
from routerlib import reference as ref
from routerlib.metrics import RoutingStats
from routerlib.models import LMConfig, MoETransformer

pytest.importorskip("ipywidgets")
from routerlib.widgets import TextRoutingExplorer, token_labels, validation_passages  # noqa: E402


@pytest.fixture(scope="module")
def explorer():
    cfg = LMConfig(vocab_size=4096, max_seq_len=64, num_layers=3, hidden_size=32, num_heads=2,
                   ffn_size=16, router=RouterConfig(num_experts=6, top_k=2, renormalize=True),
                   first_layer_dense=True, init_std=0.5)
    torch.manual_seed(0)
    passages = validation_passages(num=2, length=12)
    return TextRoutingExplorer(MoETransformer(cfg), passages, label="tiny test model")


def _expected(ex: TextRoutingExplorer) -> RoutingStats:
    v = ex.values()
    logits = ex.layer_logits(v["passage"], v["precision"])[v["layer"]]
    sel = ref.select(logits, ex.cfg)
    return RoutingStats.from_plan(ref.build_plan(sel, ex.cfg))


def test_controls_reroute(explorer):
    ex = explorer
    assert ex.stats is not None and ex.updates == 1 and ex.image.value
    assert "tiny test model" in ex.widget.children[0].value
    png = ex.image.value
    ex.controls["capacity_factor"].value = 0.5  # C = ceil(0.5 * 12 * 2 / 6) = 2 of 24 slots
    assert ex.cfg.capacity_factor == 0.5 and ex.stats.capacity == 2
    assert ex.stats.dropped > 0 and ex.image.value != png
    exp = _expected(ex)
    assert (ex.stats.load == exp.load).all() and (ex.stats.kept == exp.kept).all()
    assert f"drop rate {ex.stats.drop_rate:.1%}" in ex.text.value
    ex.controls["dropless"].value = True
    assert ex.stats.dropped == 0 and ex.stats.capacity is None
    ex.controls["K"].value = 6  # K = E
    assert ex.stats.num_slots == 12 * 6 and (ex.stats.load == 12).all()
    ex.controls["K"].value = 1
    ex.controls["layer"].value = 1
    exp = _expected(ex)
    assert (ex.stats.load == exp.load).all() and (ex.stats.kept == exp.kept).all()
    ex.controls["dropless"].value = False
    ex.controls["strategy"].value = "expert_choice"
    assert ex.cfg.routing == "expert_choice" and ex.stats.dropped == 0
    assert (ex.stats.kept == ex.cfg.capacity(12)).all()  # every expert fills its C slots
    ex.controls["precision"].value = "bf16"
    assert ex.layer_logits(ex.values()["passage"], "bf16")[0].dtype == torch.bfloat16
    ex.controls["passage"].value = list(ex.passages)[1]
    exp = _expected(ex)
    assert (ex.stats.load == exp.load).all() and ex.error is None
    if "triton" in ex.controls["backend"].options:  # a GPU, or TRITON_INTERPRET=1
        ex.controls["strategy"].value = "token_choice"
        ex.controls["backend"].value = "triton"
        exp = _expected(ex)
        assert (ex.stats.load == exp.load).all() and (ex.stats.kept == exp.kept).all()
        ex.controls["backend"].value = "torch"


def test_invalid_setting_is_reported(explorer):
    ex = explorer
    ex.controls["strategy"].value = "token_choice"
    ex.controls["dropless"].value = True
    before = ex.updates
    ex.base_cfg = dataclasses.replace(ex.base_cfg, n_groups=3, topk_groups=1)  # 2 experts left
    ex.controls["K"].value = 4
    assert ex.error and "top_k" in ex.error and ex.updates == before
    assert "invalid" in ex.text.value


def test_token_labels_and_passages():
    passages = validation_passages(num=3, length=12)
    assert len(passages) == 3
    for ids in passages.values():
        assert ids.shape == (12,) and ids.dtype == torch.long
        labels = token_labels(ids)
        assert len(labels) == 12 and all(labels) and not any("\n" in s for s in labels)
    with pytest.raises(ValueError, match="passages"):
        TextRoutingExplorer(MoETransformer(LMConfig(vocab_size=64, num_layers=1,
                                                    hidden_size=16, num_heads=2)), {})
