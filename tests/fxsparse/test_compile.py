"""backend="fxsparse" end to end: eager vs inductor vs fxsparse on tiny models, options, report, entry point."""

import subprocess
import sys
import textwrap

import pytest
import torch

import fxsparse
from fxsparse.compile import CompileOptions, clear_compile_report, compile_module, compile_report
from fxsparse.models import tiny_model

# One combined comparison per architecture (two inductor compiles each). The recipe is chosen so that,
# over the four models, every pass fires: S²FT freezes Q/K/V and gate/up (sibling GEMMs), keeps the head
# frozen (dhidden in forward) and its layers are fxsparse ops; full fine-tuning trains the head
# (backward recomputes) and leaves the gated FFN to the gated-activation pass.
CASES = {
    "llama": ("s2ft", {"linear_cross_entropy": "fused", "sibling_linears": "fused", "s2ft_split_gemm": "found"}),
    "qwen2": ("full", {"linear_cross_entropy": "fused", "gated_activation": "fused"}),
    "gpt2": ("s2ft", {"linear_cross_entropy": "fused", "s2ft_split_gemm": "found"}),
    "phi3": ("full", {"linear_cross_entropy": "fused", "gated_activation": "fused"}),
}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    # every test compiles the same transformers forward again: start from empty dynamo caches so the
    # recompile limit of one test file never leaks into the next test
    torch._dynamo.reset()
    yield


def _ids(seed=0):
    return torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(seed))


def _model(arch, recipe):
    torch.manual_seed(0)
    model = tiny_model(arch)
    if recipe == "s2ft":
        ratios = {"o": 0.5, "down": 0.25} if arch != "gpt2" else {"o": 0.5, "down": 0.25, "v": 0.5}
        model = fxsparse.transform(model, "s2ft", ratios=ratios)
    return model


def _loss_and_grads(fn, model, x):
    params = fxsparse.trainable_parameters(model)
    loss = fn(x, labels=x).loss
    loss.backward()
    grads = [p.grad.clone() for p in params]
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


@pytest.mark.parametrize("arch", list(CASES))
def test_eager_inductor_and_fxsparse_agree(arch):
    recipe, expected = CASES[arch]
    model = _model(arch, recipe)
    x = _ids()
    torch._dynamo.reset()
    clear_compile_report()
    eager = _loss_and_grads(model, model, x)
    # fullgraph=True: a graph break fails the test
    inductor = _loss_and_grads(torch.compile(model, backend="inductor", fullgraph=True), model, x)
    # every pass, not only the defaults: this is the check that each one keeps the function under inductor
    compiled = torch.compile(model, backend="fxsparse", fullgraph=True, options={"passes": "all"})
    ours = _loss_and_grads(compiled, model, x)
    ours_again = _loss_and_grads(compiled, model, _ids(1))  # a second batch: no recompilation needed
    for loss, grads in (inductor, ours):
        torch.testing.assert_close(loss, eager[0], rtol=1e-4, atol=1e-4)
        for g, ref in zip(grads, eager[1], strict=True):
            torch.testing.assert_close(g, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours_again[0], _loss_and_grads(model, model, _ids(1))[0], rtol=1e-4, atol=1e-4)

    report = compile_report(model)
    assert len(report.graphs) == 1  # one graph: no break, no recompile
    statuses = {(f.pass_name, f.status) for f in report.fusions}
    for pass_name, status in expected.items():
        assert (pass_name, status) in statuses, str(report)


def test_inference_and_pass_selection():
    model = tiny_model("llama").eval()
    x = _ids()
    with torch.no_grad():
        ref = model(x, labels=x)
        compiled = torch.compile(model, backend="fxsparse", fullgraph=True,
                                 options={"compiler": "aot_eager", "passes": ["linear_cross_entropy"]})
        out = compiled(x, labels=x)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-6)
    report = compile_report(model)
    assert {f.pass_name for f in report.fusions} == {"linear_cross_entropy"}
    assert "no grad" in report.fusions[0].detail
    assert [name for name, _, _ in report.graphs[-1].passes] == ["linear_cross_entropy"]


def test_options_are_validated():
    assert CompileOptions.parse({"passes": ["layer_ops", "gated_activation"]}).passes == \
        ("gated_activation", "layer_ops")
    assert CompileOptions.parse(None).passes == ("linear_cross_entropy", "layer_ops")
    assert "gated_activation" in CompileOptions.parse({"compiler": "aot_eager"}).passes
    assert CompileOptions.parse({"passes": "all"}).passes == fxsparse.compile.PASSES
    with pytest.raises(ValueError, match="unknown fxsparse compile pass"):
        CompileOptions.parse({"passes": ["fuse_everything"]})
    with pytest.raises(ValueError, match="unknown fxsparse backend option"):
        CompileOptions.parse({"pases": []})
    with pytest.raises(ValueError, match="compiler"):
        CompileOptions.parse({"compiler": "tvm"})
    compiled = torch.compile(torch.nn.Linear(2, 2), backend="fxsparse", options={"passes": ["nope"]})
    with pytest.raises(Exception, match="unknown fxsparse compile pass"):
        compiled(torch.randn(1, 2))


def test_report_belongs_to_its_model():
    a, b = tiny_model("llama"), tiny_model("llama")
    x = _ids()
    torch.compile(a, backend="fxsparse", options={"compiler": "eager"})(x, labels=x)
    assert fxsparse.compile_report(a).graphs and not fxsparse.compile_report(b).graphs
    assert "linear_cross_entropy: fused at lm_head" in str(compile_report(a))


def test_backend_works_without_importing_fxsparse_first(tmp_path):
    # the torch_dynamo_backends entry point finds it (the package must be installed, as `make setup` does)
    script = textwrap.dedent("""
        import sys, torch
        assert "fxsparse" not in sys.modules
        layer = torch.nn.Linear(3, 2)
        x = torch.randn(4, 3, requires_grad=True)
        out = torch.compile(layer, backend="fxsparse", options={"compiler": "aot_eager"})(x)
        out.sum().backward()
        assert torch.allclose(out, layer(x)) and x.grad is not None
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]


def test_compile_module_keeps_names_and_pretrain_cli_switch(monkeypatch):
    from fxsparse.app import pretrain

    args = pretrain.parse_args(["--preset", "60m", "--compile"])
    assert args.compile == "fxsparse"
    assert pretrain.parse_args(["--preset", "60m"]).compile is None
    model = tiny_model("llama")
    keys = list(model.state_dict())
    compile_module(model, options={"compiler": "eager"})
    x = _ids()
    model(x, labels=x).loss.backward()
    assert list(model.state_dict()) == keys and compile_report(model).graphs


def test_finetune_cli_compiles_training_only(tmp_path, monkeypatch):
    import argparse

    import fxsparse.compile
    from fxsparse.app.finetune import add_parser, run

    calls = []
    real = fxsparse.compile.compile_module

    def fake_compile(model, backend="fxsparse", **kwargs):
        calls.append(backend)
        return real(model, backend=backend, options={"compiler": "eager"})  # no inductor build in this test

    monkeypatch.setattr(fxsparse.compile, "compile_module", fake_compile)
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["finetune", "--model", "tiny-llama", "--task", "add", "--ratios", "o=0.5,down=0.25",
                              "--steps", "2", "--batch-size", "2", "--train-n", "8", "--eval-n", "0", "--warmup",
                              "0", "--no-progress", "--threads", "1", "--compile", "--out", str(tmp_path)])
    metrics = run(args)
    assert calls == ["fxsparse"] and metrics["compile"] == "fxsparse" and len(metrics["losses"]) == 2


def test_dynamic_shapes_keep_the_fusions():
    model = _model("llama", "s2ft")
    compiled = torch.compile(model, backend="fxsparse", dynamic=True, options={"compiler": "aot_eager"})
    for length in (12, 17):
        x = torch.randint(0, 96, (2, length), generator=torch.Generator().manual_seed(length))
        ref, ref_grads = _loss_and_grads(model, model, x)
        loss, grads = _loss_and_grads(compiled, model, x)
        torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
        for g, r in zip(grads, ref_grads, strict=True):
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)
    statuses = compile_report(model).counts()
    assert statuses[("linear_cross_entropy", "fused")] >= 1 and statuses[("s2ft_split_gemm", "found")] >= 4


def test_the_passes_run_in_a_pass_manager_pipeline():
    from fxsparse.passes.compile_records import capture_graph, fusions
    from fxsparse.passes.fuse_gated_activation import fuse_gated_activation
    from fxsparse.passes.fuse_linear_cross_entropy import fuse_linear_cross_entropy
    from fxsparse.passes.manager import PassManager

    model = tiny_model("llama")
    x = _ids()
    gm, inputs = capture_graph(model, x, labels=x, use_cache=False)
    manager = PassManager([fuse_linear_cross_entropy, fuse_gated_activation], inputs=("graph", "config"),
                          config_cls=CompileOptions)
    out = manager.run({"graph": gm, "config": CompileOptions(chunk_rows=5)})["graph"]
    assert [(f.pass_name, f.status) for f in fusions(out)] == [("linear_cross_entropy", "fused")] + \
        [("gated_activation", "fused")] * 2
    fused_ce = next(n for n in out.graph.nodes if n.target is torch.ops.fxsparse.linear_cross_entropy.default)
    assert fused_ce.args[8] == 5  # chunk_rows came from the config
    loss = next(o for o in out(*inputs) if o.dim() == 0)
    torch.testing.assert_close(loss, model(x, labels=x).loss, rtol=1e-6, atol=1e-6)
