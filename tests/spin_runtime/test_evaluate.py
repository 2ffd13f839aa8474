"""evaluate: exact match and reference log-likelihood on the held-out split."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from spin_common import data, manifest
from spin_runtime import cli, evaluate, formatting, models, tiny
from spin_runtime.generate.backends import SamplingConfig
from spin_runtime.generate.transformers_backend import TransformersBackend

EVAL = 8


@pytest.fixture(scope="module")
def graded_dataset(tiny_varied_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A dataset whose held-out references are the model's own greedy answers for half of the
    examples (with extra whitespace) and something else for the other half: exact match is 0.5."""
    rows = tiny.make_task_rows(40, seed=5)
    path = tmp_path_factory.mktemp("eval") / "d.jsonl"
    tiny.write_jsonl(rows, path)
    split = data.load_split(str(path), seed=1, max_samples=0, eval_samples=EVAL)
    tok = models.load_tokenizer(str(tiny_varied_model_dir))
    backend = TransformersBackend(str(tiny_varied_model_dir), tok)
    prompts = [formatting.prompt_ids(tok, e.system, e.prompt) for e in split.eval]
    answers = backend.generate(prompts, SamplingConfig(temperature=0, max_new_tokens=6), [6] * EVAL)
    backend.close()
    for k, (example, answer) in enumerate(zip(split.eval, answers, strict=True)):
        reference = "  " + answer.text.replace(" ", "  \n") + " " if k % 2 == 0 else "NOPE"
        rows[example.id]["messages"][-1]["content"] = reference
    return tiny.write_jsonl(rows, path)


def _expected_logp(model_dir: Path, examples: list[data.Example]) -> float:
    tok = models.load_tokenizer(str(model_dir))
    model = models.load_model(str(model_dir), tokenizer=tok)
    total, count = 0.0, 0
    for e in examples:
        p = formatting.prompt_ids(tok, e.system, e.prompt)
        r = formatting.response_ids(tok, e.response)
        with torch.no_grad():
            logits = model(torch.tensor([p + r])).logits[0].float()
        logp = torch.log_softmax(logits, -1)
        total += sum(float(logp[len(p) - 1 + j, t]) for j, t in enumerate(r))
        count += len(r)
    return total / count


def test_exact_match_and_logp_with_baseline(
    tiny_varied_model_dir: Path, tiny_model_dir: Path, graded_dataset: Path, tmp_path: Path
) -> None:
    out = tmp_path / "eval"
    code = cli.main(
        [
            "evaluate",
            "--model",
            str(tiny_varied_model_dir),
            "--baseline-model",
            str(tiny_model_dir),
            "--dataset",
            str(graded_dataset),
            "--eval-samples",
            str(EVAL),
            "--seed",
            "1",
            "--max-new-tokens",
            "6",
            "--output",
            str(out),
            "--batch-size",
            "3",
        ]
    )
    assert code == 0
    assert manifest.is_complete(str(out), verify=True)
    results = json.loads((out / "results.json").read_text())
    metrics = results["metrics"]
    assert metrics["exact_match"] == 0.5
    assert metrics["num_examples"] == EVAL
    held_out = data.load_split(str(graded_dataset), 1, 0, EVAL).eval
    assert metrics["real_logp_per_token"] == pytest.approx(
        _expected_logp(tiny_varied_model_dir, held_out), abs=1e-4
    )
    base = results["baseline"]
    assert base["real_logp_per_token"] == pytest.approx(
        _expected_logp(tiny_model_dir, held_out), abs=1e-4
    )
    assert base["real_logp_per_token"] != metrics["real_logp_per_token"]
    answers = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    assert [a["id"] for a in answers] == [e.id for e in held_out]
    assert sum(a["exact"] for a in answers) == EVAL // 2
    assert all("baseline_answer" in a for a in answers)
    # Short answers: `score` (what evaluation.metric auto ranks by) is exact match.
    assert results["score_metric"]["metric"] == "exact_match"
    assert (metrics["score"], base["score"]) == (metrics["exact_match"], base["exact_match"])


def test_score_is_the_real_answer_loglik_on_free_text(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Chat-like references (long free text): exact match is 0 for any model, so `score` is the
    real answers' log-likelihood per token."""
    rows = tiny.make_task_rows(24, seed=3)
    for k, row in enumerate(rows):
        row["messages"][-1]["content"] = " ".join(
            tiny._WORDS[(k + j) % len(tiny._WORDS)] for j in range(40)
        )
    dataset = tiny.write_jsonl(rows, tmp_path / "chat.jsonl")
    out = tmp_path / "eval"
    assert (
        cli.main(
            [
                "evaluate",
                "--model",
                str(tiny_model_dir),
                "--dataset",
                str(dataset),
                "--eval-samples",
                "4",
                "--max-new-tokens",
                "4",
                "--output",
                str(out),
            ]
        )
        == 0
    )
    results = json.loads((out / "results.json").read_text())
    assert results["score_metric"]["metric"] == "real_logp_per_token"
    assert "median 40 words" in results["score_metric"]["why"]
    assert results["metrics"]["exact_match"] == 0.0
    assert results["metrics"]["score"] == results["metrics"]["real_logp_per_token"] < 0


def test_score_metric_rule() -> None:
    short = [data.Example(i, None, "q", "12") for i in range(5)]
    long = [data.Example(i, None, "q", "word " * 120) for i in range(5)]
    assert data.score_metric(short)[0] == "exact_match"
    assert data.score_metric(long)[0] == "real_logp_per_token"
    # The median decides: a few long answers among short ones do not flip it.
    assert data.score_metric(short + long[:2])[0] == "exact_match"


def test_normalize() -> None:
    assert evaluate.normalize("  a \n b\t c ") == "a b c"
    assert evaluate.normalize("") == ""


def test_logp_of_a_uniform_model_is_log_vocab() -> None:
    """A model whose logits are all equal gives log(1/V) per token, whatever the padding."""

    class Uniform(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, input_ids, attention_mask):  # type: ignore[no-untyped-def]
            return type("O", (), {"logits": torch.zeros(*input_ids.shape, 10)})()

    total, count = evaluate.reference_logprobs(Uniform(), [([1, 2], [3, 4, 5]), ([1], [2])], 0, 2)
    assert count == 4 and total == pytest.approx(4 * math.log(1 / 10))


@pytest.mark.parametrize(
    ("extra", "message"),
    [(["--eval-samples", "0"], "--eval-samples"), (["--max-new-tokens", "0"], "--max-new-tokens")],
)
def test_bad_input_exits_2_without_manifest(
    tiny_model_dir, tiny_dataset_path, tmp_path, capsys, extra, message
) -> None:
    out = tmp_path / "eval"
    base = ["evaluate", "--model", str(tiny_model_dir), "--dataset", str(tiny_dataset_path),
            "--output", str(out), "--eval-samples", "4"]  # fmt: skip # argv: a flag beside its value
    assert cli.main(base + extra) == 2
    assert message in capsys.readouterr().err
    assert not (out / "_MANIFEST.json").exists()


def test_missing_model_exits_2_and_removes_old_manifest(
    tiny_model_dir, tiny_dataset_path, tmp_path, capsys
) -> None:
    out = tmp_path / "eval"
    args = ["evaluate", "--dataset", str(tiny_dataset_path), "--output", str(out),
            "--eval-samples", "4", "--max-new-tokens", "2"]  # fmt: skip # argv: a flag beside its value
    assert cli.main([*args, "--model", str(tiny_model_dir)]) == 0
    assert (out / "_MANIFEST.json").exists()
    assert cli.main([*args, "--model", str(tmp_path / "gone")]) == 2
    assert "gone" in capsys.readouterr().err
    assert not (out / "_MANIFEST.json").exists()


def test_metrics_reach_mlflow(
    mlflow_server, tiny_model_dir, tiny_dataset_path, tmp_path, monkeypatch
) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server.uri)
    run_id = client.create_run(client.create_experiment(f"eval-{tmp_path.name}")).info.run_id
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    monkeypatch.setenv("MLFLOW_RUN_ID", run_id)
    monkeypatch.setenv("SPIN_TRACKING_SPOOL_DIR", str(tmp_path / "spool"))
    out = tmp_path / "eval"
    argv = ["evaluate", "--model", str(tiny_model_dir), "--baseline-model", str(tiny_model_dir),
            "--dataset", str(tiny_dataset_path), "--output", str(out),
            "--eval-samples", "4", "--max-new-tokens", "2"]  # fmt: skip # argv: a flag beside its value
    assert cli.main(argv) == 0
    metrics = json.loads((out / "results.json").read_text())["metrics"]
    logged = client.get_run(run_id).data.metrics
    assert logged["eval/exact_match"] == metrics["exact_match"]
    assert logged["eval/real_logp_per_token"] == pytest.approx(metrics["real_logp_per_token"])
    # θ0's numbers are in results.json (and the parent's heldout/* at step 0), not one-point
    # eval/baseline_* panels of the iteration's run
    baseline = json.loads((out / "results.json").read_text())["baseline"]
    assert baseline["real_logp_per_token"] == pytest.approx(metrics["real_logp_per_token"])
    assert not [k for k in logged if "baseline" in k]
    # The sample generations table: θt+1's answers beside the references (and θ0's), once.
    (tmp_path / "dl").mkdir()
    table = json.loads(
        Path(
            client.download_artifacts(run_id, "eval_samples.json", str(tmp_path / "dl"))
        ).read_text()
    )
    assert table["columns"] == ["id", "prompt", "reference", "answer", "exact", "baseline_answer"]
    assert len(table["data"]) == 4
    assert cli.main(argv) == 0
    (tmp_path / "dl2").mkdir()
    again = json.loads(
        Path(
            client.download_artifacts(run_id, "eval_samples.json", str(tmp_path / "dl2"))
        ).read_text()
    )
    assert len(again["data"]) == 4  # a retry does not append
