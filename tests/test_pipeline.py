"""The library is the product too: the README's pipeline calls, on the shipped model."""

from rvdeploy import pipeline

from conftest import DIGITS_CKPT, ROOT

CALIB = ROOT / "calib" / "digits"
HELDOUT = ROOT / "models" / "digits" / "heldout"


def test_every_command_is_one_library_call(tmp_path):
    load = pipeline.LoadOptions(bn_eps=1e-5)
    fused = pipeline.fuse_checkpoint(DIGITS_CKPT, tmp_path / "digits.safetensors", load)
    assert fused.report.passed and fused.report.worst_block_ratio < 1 and fused.output.exists()
    assert pipeline.describe_checkpoint(fused.output)["form"] == "deploy"
    exported = pipeline.export_model(DIGITS_CKPT, tmp_path / "digits.onnx", pipeline.ExportOptions(), load)
    assert exported.fold.passed and exported.weights.form == "fused"
    assert pipeline.verify_model(tmp_path / "digits.onnx", DIGITS_CKPT, load).ok
    report = pipeline.quantize_model(tmp_path / "digits.onnx", tmp_path / "int8.onnx",
                                     pipeline.Int8Options(CALIB, target="onnxruntime", show_progress=False))
    assert (report.calibration_images, report.held_out_images, report.quantized_nodes) == (224, 32, 9)  # the floor holds 32 out
    built = pipeline.build(tmp_path / "digits.onnx", tmp_path / "digits.engine",
                           pipeline.BuildOptions(backend="rtx", precision=pipeline.Fp16Options()))
    assert built.build.sidecar["precision"] == "fp16" and built.typed_graph.exists()
    result = pipeline.evaluate_models([tmp_path / "digits.onnx", tmp_path / "int8.onnx"], HELDOUT,
                                      pipeline.EvalOptions(compare=True))
    fp32, int8 = (e.accuracy for e in result.evaluations)
    assert fp32.top1 > 99 and abs(fp32.top1 - int8.top1) <= 0.5 and result.agreements[1].top1_agreement > 0.97
    timing = pipeline.bench([tmp_path / "digits.onnx"], pipeline.BenchOptions(
        settings=pipeline.BenchSettings(batches=(1,), warmup_s=0, min_s=0.01, iters=2), plot=tmp_path / "bench.png"))
    assert [r["model"] for r in timing.report["results"]] == ["digits"] and not timing.regressed
    assert (tmp_path / "bench.png").exists()
