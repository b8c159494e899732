"""ONNX export through torch.onnx's exporter (dynamo=True), run in onnxruntime with a dynamic sequence length,
against transformers' OPT on the same weights."""

from __future__ import annotations

import pytest
import torch
from tiny import batch, make_pair, record

pytestmark = pytest.mark.usefixtures("one_thread")
ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (it is in the test extra)")
pytest.importorskip("onnxscript", reason="onnxscript is not installed (it is in the test extra)")


def test_onnx_export_runs_in_onnxruntime_at_other_lengths(tmp_path):
    ref, ours = make_pair("OPTForCausalLM", "post_ln_proj")
    ids, mask = batch("left")
    seq = torch.export.Dim("seq", min=2, max=ours.config.max_position_embeddings)
    path = tmp_path / "opt.onnx"
    torch.onnx.export(ours, (ids,), str(path), kwargs={"attention_mask": mask, "use_cache": False}, dynamo=True,
                      dynamic_shapes={"input_ids": {1: seq}, "attention_mask": {1: seq}, "use_cache": None})
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for length in (7, 4):
        i, m = ids[:, -length:].contiguous(), mask[:, -length:].contiguous()
        logits = torch.from_numpy(session.run(None, {"input_ids": i.numpy(), "attention_mask": m.numpy()})[0])
        with torch.no_grad():
            theirs = ref(i, attention_mask=m).logits
        keep = m.bool()  # pad positions attend to nothing; onnxruntime fills them differently
        assert record("onnxruntime logits", logits[keep], theirs[keep], relative=True) < 1e-5
