"""Generated blocks in docs/ and README are what their commands print from the stored result files (the CI check for
stale generated documents, through the real script)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from render_docs import render  # noqa: E402


def test_no_generated_block_is_stale():
    out = subprocess.run(
        [sys.executable, "scripts/render_docs.py", "--check"], cwd=ROOT, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_a_stale_block_is_found_and_rewritten():
    cmd = "scripts/compare_table.py docs/ablations/coma_sample_images.json"
    text = f"intro\n<!-- BEGIN GENERATED: {cmd} -->\n| an old table |\n<!-- END GENERATED -->\nafter\n"
    new, changed = render(text, ROOT)
    assert changed == [cmd]
    assert "| an old table |" not in new and "coma_dyvit_pico_128:mode=pair" in new and new.endswith("after\n")
    assert render(new, ROOT)[1] == []  # rendering again changes nothing


def test_bench_table_renders_the_median_ratio_range_and_per_image_flops(tmp_path):
    from bench_table import render as render_bench

    row = dict(model="a", img_size=224, batch_size=4, step_time_s=0.5, images_per_s=8.0, peak_memory_mb=100.0,
               memory_kind="cpu_peak_rss_growth", encoder_gflops=8.0, decoder_gflops=2.0, rounds=3,
               speed_vs_first=1.0, speed_vs_first_range=[1.0, 1.0], memory_vs_first=1.0)  # fmt: skip
    other = dict(row, model="b:mode=x", step_time_s=0.25, images_per_s=16.0, speed_vs_first=1.9,
                 speed_vs_first_range=[1.5, 2.25], peak_memory_mb=50.0, memory_vs_first=0.5)  # fmt: skip
    path = tmp_path / "r.json"
    path.write_text(
        json.dumps({"date": "2026-01-02", "machine": "M", "command": "mimkit bench X", "rows": [row, other]})
    )
    text = render_bench(path)
    assert text.startswith("2026-01-02, M, 3 alternating rounds") and "mimkit bench X" in text
    assert "| `b:mode=x` | 224 | 250 | 16.00 | 1.90x (1.50-2.25) | 50 | 0.50x | 8 | 2 |" in text  # per image


def test_reference_ratios_history_gives_each_runs_per_round_median_and_range(tmp_path):
    from reference_ratios import history

    def line(row, seconds):
        return "RESULT " + json.dumps({"row": row, "times": seconds, "peak_growth_MB": 1.0})

    log = tmp_path / "run.log"  # two rounds: the reference 2.0 then 2.4 s, mimkit 1.0 s; ViTMAE 3 s, MAE 2 s
    one_round = [("ref_umae_pvt_s", 2.0), ("mkk_umae_pvt_s", 1.0), ("hf_mae_vit_b", 3.0), ("mkk_mae_vit_b", 2.0)]
    rounds = one_round + [("ref_umae_pvt_s", 2.4)] + one_round[1:]
    probes = ["RESULT " + json.dumps({"row": "machine_rate", "gflops": g}) for g in (380.0, 300.0, 350.0)]
    log.write_text("# 2026-01-02 2 cores, eager, rounds 2, at abc1234, CPU-9\n" + "\n".join(
        line(row, [s, s + 0.001, s - 0.001]) for row, s in rounds) + "\n" + "\n".join(probes) + "\n")  # fmt: skip
    table = history([str(log)]).splitlines()
    assert table[0].startswith("| commit | log | UM-MAE Swin-T |") and len(table) == 3
    cells = [c.strip() for c in table[2].strip("|").split("|")]
    assert cells[:2] == ["abc1234", "`run.log`"]
    assert cells[4] == "2.20x (2.00-2.40)" and cells[6] == "1.50x (1.50-1.50)"  # UM-MAE PVT-S; MAE over ViTMAE
    assert cells[2] == cells[3] == cells[5] == "-" and cells[7] == "2"  # rows not run; rounds
    assert cells[8] == "350 GFLOP/s (300-380)"  # the probes' median and range
    old = tmp_path / "old.log"  # a log from before the probes
    old.write_text("\n".join(line(row, [s]) for row, s in one_round) + "\n")
    assert history([str(old)]).splitlines()[2].rstrip("|").rsplit("|", 1)[-1].strip() == "-"


def test_machine_rate_times_a_product_and_prints_a_result_line(capsys):
    from _results import results_in
    from machine_rate import main, rate

    assert rate(64, 32, 64, repeats=3, warmup=1) > 0
    main(["--repeats", "2"])
    (result,) = results_in(capsys.readouterr().out)
    assert result["row"] == "machine_rate" and result["gflops"] > 0 and result["shape"] == [2048, 512, 2048]
