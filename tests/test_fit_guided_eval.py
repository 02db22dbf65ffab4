"""Template building, test-time fitting, guided inference and the evaluation script, on tiny settings."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastavatar.io.checkpoints import save_decoder_checkpoint
from fastavatar.data import SubjectParser
from fastavatar.inference.refine import FitConfig, fit_to_views, mean_w
from fastavatar.inference.guided import GuidedConfig, run_guided
from fastavatar.inference.per_gaussian import PerGaussianConfig
from fastavatar.models.decoder import DecoderConfig, GaussianDecoder
from fastavatar.io.ply import load_ply, save_ply
from fastavatar.train.template import TemplateFitConfig, average_splats, fit_subject, initial_splats, knn_mean_distance

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def parser306(data_root):
    return SubjectParser(data_root / "306", image_scale=0.125)


@pytest.fixture(scope="module")
def tiny_decoder_ckpt(tmp_path_factory, parser306):
    decoder = GaussianDecoder(initial_splats(parser306), DecoderConfig(hidden_dim=32, body_layers=2, init="zero_out"))
    with torch.no_grad():  # a "trained" decoder: output layers no longer zero, so W gets gradients
        gen = torch.Generator().manual_seed(1)
        for head in decoder.conditioning_mlp.heads().values():
            head[-1].weight.copy_(torch.randn(head[-1].weight.shape, generator=gen) * 0.01)
    w = torch.randn(2, 512, generator=torch.Generator().manual_seed(0)) * 0.1
    path = tmp_path_factory.mktemp("ckpt") / "decoder.pth"
    save_decoder_checkpoint(path, decoder, w, {"306": 0, "369": 1}, epoch=1, global_step=1, config={})
    return path


def test_knn_distance_matches_brute_force():
    pts = torch.randn(50, 3)
    d = torch.cdist(pts, pts) + torch.eye(50) * 1e9
    ref = d.topk(3, largest=False).values.mean(1)
    assert torch.allclose(knn_mean_distance(pts, chunk=7), ref, atol=1e-6)


def test_initial_splats_take_colours_from_images(parser306):
    splats = initial_splats(parser306)
    assert splats["means"].shape == (10144, 3) and torch.equal(splats["means"], parser306.points)
    from fastavatar.core.splats import sh0_to_rgb

    rgb = sh0_to_rgb(splats["sh0"][:, 0])
    assert rgb.std() > 0.05  # not a flat grey: the face has varied colours
    assert (rgb.mean() < 0.95)  # and not the white background


def test_template_fit_lowers_loss_and_average_is_consistent(parser306):
    from fastavatar.losses import l1_loss
    from fastavatar.render import render_splats

    cfg = TemplateFitConfig(iterations=25, views_per_step=2, render_backend="torch")
    init = initial_splats(parser306)
    fitted = fit_subject(parser306, cfg, show_progress=False)
    target = parser306.load_image(5)[None]

    def err(s):
        return float(l1_loss(render_splats(s, parser306.c2w[5], parser306.Ks[5], parser306.width, parser306.height,
                                           backend="torch").rgb, target))

    assert err(fitted) < err(init)
    assert torch.equal(fitted["means"], init["means"])  # positions stay on the triangles
    avg = average_splats([fitted, init])
    assert torch.allclose(avg["scales"], (fitted["scales"] + init["scales"]) / 2)
    assert torch.allclose(avg["quats"].norm(dim=1), torch.ones(10144), atol=1e-5)
    flipped = {**fitted, "quats": -fitted["quats"]}
    assert torch.allclose(average_splats([fitted, flipped])["quats"], average_splats([fitted])["quats"], atol=1e-6)


def test_fit_to_one_view_improves_it_and_keeps_decoder_untouched(tiny_decoder_ckpt, parser306):
    from fastavatar.io.checkpoints import load_decoder

    decoder, w_vectors, _ = load_decoder(tiny_decoder_ckpt)
    before = {k: v.clone() for k, v in decoder.state_dict().items()}
    view = 8
    image = parser306.load_image(view)[None]
    cfg = FitConfig(w_steps=8, mlp_steps=8, w_lr=3e-2, mlp_lr=3e-3, lpips_weight=0.0, scale_reg=0.01, render_backend="torch")
    result = fit_to_views(decoder, mean_w(w_vectors), parser306.points, image, parser306.c2w[view:view + 1],
                          parser306.Ks[view:view + 1], parser306.width, parser306.height, cfg, show_progress=False)
    assert len(result.losses) == 16 and result.losses[-1] < result.losses[0]
    assert not torch.equal(result.w, mean_w(w_vectors))
    assert set(result.seconds) == {"w", "mlp"}
    for k, v in decoder.state_dict().items():
        assert torch.equal(v, before[k]), f"caller's decoder changed: {k}"
    # the final splats come from the final parameters: their loss on the input view is below the
    # loss of the last step (taken before the last update) and the initial splats' loss
    from fastavatar.losses import photometric_loss
    from fastavatar.render import render_splats

    def loss_of(s):
        rgb = render_splats(s, parser306.c2w[view], parser306.Ks[view], parser306.width, parser306.height,
                            backend="torch").rgb
        return float(photometric_loss(rgb, image, 0.6, 0.3, 0.0)["total"])

    assert loss_of(result.splats) < loss_of(result.initial_splats)
    assert loss_of(result.splats) <= result.losses[-1] + 1e-4


def test_guided_run_writes_all_outputs(tmp_path, tiny_decoder_ckpt, data_root):
    cfg = GuidedConfig(data_root=str(data_root), sample_id="306", decoder_checkpoint=str(tiny_decoder_ckpt),
                       encoder_checkpoint=str(tmp_path / "absent.pth"),
                       fit=FitConfig(w_steps=2, mlp_steps=2, w_lr=1e-2, mlp_lr=1e-3, lpips_weight=0.0,
                                     render_backend="torch"),
                       gaussians=PerGaussianConfig(pg_steps=3, pg_lpips_weight=0.0),
                       input_views=["0", "8"], image_scale=0.125, output_dir=str(tmp_path / "g"), device="cpu")
    summary = run_guided(cfg, show_progress=False)
    assert [r["input_views"] for r in summary["runs"]] == [["00000_00.png"], ["00000_08.png"]]
    assert all(r["w_init"].startswith("mean_w (no encoder checkpoint") for r in summary["runs"])
    run = tmp_path / "g" / "sample_306" / "input08"
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics["initial"]) == {"input", "unseen"} and metrics["final"]["unseen"]["psnr"] > 5
    assert set(metrics["seconds"]) >= {"w_phase", "mlp_phase", "per_gaussian_phase", "refine_total"}
    assert metrics["per_gaussian"].startswith("3 steps")
    # the per-Gaussian stage runs after W + MLP: the final splats differ from the fit, and fit the input better
    fit, final = load_ply(run / "fit" / "splats.ply"), load_ply(run / "final" / "splats.ply")
    assert final["means"].shape == (10144, 3) and not torch.equal(fit["sh0"], final["sh0"])
    assert metrics["final"]["input"]["psnr"] > metrics["fit"]["input"]["psnr"]
    assert len(list((run / "final" / "side_by_side").iterdir())) == 16
    assert len(json.loads((run / "final" / "per_view.json").read_text())) == 16
    assert (tmp_path / "g" / "summary.json").is_file() and (tmp_path / "g" / "config.yaml").is_file()


def test_evaluate_script_single_and_protocol(tmp_path, tiny_decoder_ckpt, data_root, parser306):
    save_ply(tmp_path / "s.ply", initial_splats(parser306))
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "evaluate.py"), "--splats", str(tmp_path / "s.ply"),
                          "--data_root", str(data_root), "--sample_id", "306", "--seen_views", "8", "--image_scale",
                          "0.125", "--output_dir", str(tmp_path / "ev"), "--device", "cpu", "--render_backend", "torch"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    results = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert results["seen_views"] == ["00000_08.png"] and results["unseen"]["psnr"] > 10
    per_view = json.loads((tmp_path / "ev" / "per_view.json").read_text())
    assert sum(v["seen"] for v in per_view) == 1 and len(per_view) == 16
    assert (tmp_path / "ev" / "side_by_side" / "00000_03.png").is_file()

    for sid in ("128", "306"):  # leave-one-out layout: one decoder per held-out subject
        (tmp_path / "loo" / sid).mkdir(parents=True)
        (tmp_path / "loo" / sid / "decoder.pth").write_bytes(tiny_decoder_ckpt.read_bytes())
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "evaluate.py"), "--protocol", "--subjects", "128", "306",
                          "--data_root", str(data_root), "--decoder_checkpoint",
                          str(tmp_path / "loo" / "{subject}" / "decoder.pth"), "--no-per_gaussian",
                          "--encoder_checkpoint", str(tmp_path / "none.pth"), "--w_steps", "1", "--mlp_steps", "1", "--image_scale",
                          "0.125", "--output_dir", str(tmp_path / "proto"), "--device", "cpu", "--render_backend", "torch",
                          "--lpips_weight", "0", "--no-save_images"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    table = json.loads((tmp_path / "proto" / "table.json").read_text())
    assert [r["subject"] for r in table["subjects"]] == ["128", "306"]
    assert set(table["overall"]) == {"template", "feed_forward", "fit", "full"}
    assert table["subjects"][0]["decoder_checkpoint"] == str(tmp_path / "loo" / "128" / "decoder.pth")
    assert table["subjects"][1]["decoder_checkpoint"] == str(tmp_path / "loo" / "306" / "decoder.pth")
    assert table["per_gaussian"] is False
    for row in table["subjects"]:  # the stage is off: the final splats are the W + MLP fit
        assert row["full"] == row["fit"] and row["per_gaussian_seconds"] == 0.0
    assert "| **mean** |" in (tmp_path / "proto" / "table.md").read_text()


def test_precision_choice_and_bf16_fit_tracks_fp32(tiny_decoder_ckpt, parser306):
    from fastavatar.io.checkpoints import load_decoder
    from fastavatar.inference.refine import use_bf16

    assert use_bf16("fp32", torch.device("cpu")) is False and use_bf16("bf16", torch.device("cpu")) is True
    assert use_bf16("auto", torch.device("cuda")) is False
    with pytest.raises(ValueError, match="precision must be"):
        use_bf16("fp8", torch.device("cpu"))
    decoder, w_vectors, _ = load_decoder(tiny_decoder_ckpt)
    view = 8
    args = (decoder, mean_w(w_vectors), parser306.points, parser306.load_image(view)[None],
            parser306.c2w[view:view + 1], parser306.Ks[view:view + 1], parser306.width, parser306.height)
    runs = {p: fit_to_views(*args, FitConfig(w_steps=4, mlp_steps=4, w_lr=3e-2, mlp_lr=3e-3, lpips_weight=0.0,
                                             render_backend="torch", precision=p), show_progress=False)
            for p in ("fp32", "bf16")}
    assert runs["bf16"].losses[-1] == pytest.approx(runs["fp32"].losses[-1], rel=0.05)
    assert runs["bf16"].splats["sh0"].dtype == torch.float32


def test_keep_view_dependent_colour(tiny_decoder_ckpt, parser306):
    from fastavatar.io.checkpoints import load_decoder

    decoder, w_vectors, _ = load_decoder(tiny_decoder_ckpt)
    view = 8
    args = (decoder, mean_w(w_vectors), parser306.points, parser306.load_image(view)[None],
            parser306.c2w[view:view + 1], parser306.Ks[view:view + 1], parser306.width, parser306.height)
    for keep in (True, False):
        r = fit_to_views(*args, FitConfig(w_steps=3, mlp_steps=3, w_lr=3e-2, mlp_lr=3e-3, lpips_weight=0.0,
                                          render_backend="torch", keep_view_dependent=keep), show_progress=False)
        assert torch.equal(r.splats["shN"], r.initial_splats["shN"]) is keep
        assert not torch.equal(r.splats["sh0"], r.initial_splats["sh0"])


def test_nested_choice_never_uses_the_held_out_subjects_own_score():
    from fastavatar.eval.tuning import nested_choice

    a, b = {"pg_steps": 100}, {"pg_steps": 200}
    # a wins on 128 and 306, b wins on 369 by a margin that would flip the mean over all three
    rows = [{"subject": "128", "point": a, "unseen_psnr": 20.0}, {"subject": "128", "point": b, "unseen_psnr": 19.5},
            {"subject": "306", "point": a, "unseen_psnr": 20.0}, {"subject": "306", "point": b, "unseen_psnr": 19.5},
            {"subject": "369", "point": a, "unseen_psnr": 15.0}, {"subject": "369", "point": b, "unseen_psnr": 18.0},
            {"subject": "369", "point": {"pg_steps": 300}, "unseen_psnr": 30.0}]  # not scored everywhere: ignored
    sel = nested_choice(rows, ["128", "306", "369"])
    by = {p["subject"]: p for p in sel["per_subject"]}
    assert by["369"]["chosen"] == a and by["369"]["psnr"] == 15.0  # chosen on 128 + 306, scored on 369
    assert by["128"]["chosen_on"] == ["306", "369"] and by["128"]["chosen"] == b  # 306+369: b mean 18.75 > 17.5
    assert sel["best_overall"] == b and sel["agreement"] == 2
    with pytest.raises(ValueError, match="at least two subjects"):
        nested_choice(rows, ["128"])


def test_tune_script_runs_grid_resumes_and_rejects_unknown_fields(tmp_path, tiny_decoder_ckpt, data_root):
    for sid in ("128", "306"):
        (tmp_path / "loo" / sid).mkdir(parents=True)
        (tmp_path / "loo" / sid / "decoder.pth").write_bytes(tiny_decoder_ckpt.read_bytes())
    cmd = [sys.executable, str(REPO / "scripts" / "tune_refinement.py"), "--subjects", "128", "306",
           "--data_root", str(data_root), "--loo_decoders", str(tmp_path / "loo" / "{subject}" / "decoder.pth"),
           "--w_steps", "1", "--image_scale", "0.125", "--lpips_weight", "0", "--pg_lpips_weight", "0",
           "--render_backend", "torch", "--device", "cpu", "--output_dir", str(tmp_path / "tune"),
           "--mlp_steps", "1", "--grid", '{"pg_steps": [0, 2]}']
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "tune" / "rows.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and {r["subject"] for r in rows} == {"128", "306"}
    assert all(r["unseen_psnr"] > 10 for r in rows)
    sel = json.loads((tmp_path / "tune" / "selection.json").read_text())
    by = {p["subject"]: p for p in sel["per_subject"]}
    score = {(r["subject"], json.dumps(r["point"], sort_keys=True)): r["unseen_psnr"] for r in rows}
    for sid, other in (("128", "306"), ("306", "128")):  # each choice is the other subject's best point
        best_on_other = max((p for (s, p) in score if s == other), key=lambda p: score[(other, p)])
        assert json.dumps(by[sid]["chosen"], sort_keys=True) == best_on_other
        assert by[sid]["psnr"] == score[(sid, best_on_other)]
    assert (tmp_path / "tune" / "config.yaml").is_file() and "| 128 |" in (tmp_path / "tune" / "selection.md").read_text()
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)  # everything done: nothing re-run
    assert again.returncode == 0 and "[tune] subject" not in again.stdout
    assert len((tmp_path / "tune" / "rows.jsonl").read_text().splitlines()) == 4
    bad = subprocess.run(cmd[:-1] + ['{"pg_stepz": [1]}'], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1 and "'pg_stepz' is not a FitConfig or PerGaussianConfig field" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
    one = subprocess.run(cmd[:3] + ["128"] + cmd[5:-2] + ["--output_dir", str(tmp_path / "one")], capture_output=True,
                         text=True, timeout=300)
    assert one.returncode == 1 and "needs at least two held-out subjects" in one.stderr
    assert not (tmp_path / "one").exists()  # refused before any work
