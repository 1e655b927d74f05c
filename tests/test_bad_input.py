"""The catalogue of bad input a new user types: every config group, every class of value, bad data files
and bad sweeps. Each case goes through the app's own entry point (`smt_bench.__main__.main`) in this
process and must stop in the preflight: exit 2, exactly one stderr line `smt-bench: error: ...` that
names the key or file, no traceback, nothing under the results folder, and training never reached.
(tests/test_app.py runs a few of them as real `python -m smt_bench` processes.)"""
import json
import re
import sys
from pathlib import Path

import pytest

import smt_bench.__main__ as app_main

TINY = ["model=tiny-llama", "device=cpu"]
SMT = [*TINY, "method=smt", "budget.fraction=0.005"]


def _jsonl_broken(tmp: Path) -> str:
    p = tmp / "broken.jsonl"
    good = json.dumps({"instruction": "Say yes.", "input": "", "output": "yes"})
    p.write_text(f"{good}\n{good}\n{{\"instruction\": \"Say no.\", \"output\": \"no\"\n{good}\n")
    return str(p)


def _json_list_broken(tmp: Path) -> str:
    p = tmp / "broken.json"
    p.write_text('[\n  {"instruction": "Say yes.", "input": "", "output": "yes"},\n'
                 '  {"instruction": "Say no.", "input": "", "output": "no"},\n'
                 '  {"instruction": "Say maybe.", "input": "" "output": "maybe"}\n]\n')
    return str(p)


def _records(tmp: Path, n: int, name="train.json", **extra) -> str:
    p = tmp / name
    p.write_text(json.dumps([{"instruction": f"Say {i}.", "input": "", "output": str(i), **extra}
                             for i in range(n)]))
    return str(p)


def _no_answer(tmp: Path) -> str:
    p = tmp / "test.json"
    p.write_text(json.dumps([{"instruction": "Say 1.", "input": "", "output": "1"}]))
    return str(p)


def _file(tmp: Path) -> str:
    p = tmp / "a_file"
    p.write_text("not a folder")
    return str(p)


# id: (argv builder given a scratch folder, regex the one stderr line must match after the prefix)
CASES = {
    # --- the top level -----------------------------------------------------------------------------
    "seed-negative": (lambda t: [*TINY, "seed=-1"], r"seed=-1: must be an integer in \[0, 2\^32\)"),
    "seed-not-int": (lambda t: [*TINY, "seed=abc"], r"seed=abc: must be an integer"),
    "device-unknown": (lambda t: [*TINY[:1], "device=gpu"], r"device=gpu: must be auto, cpu, cuda or cuda:N"),
    "device-no-cuda": (lambda t: [*TINY[:1], "device=cuda"], r"device=cuda: CUDA is not available here"),
    "threads-zero": (lambda t: [*TINY, "threads=0"], r"threads=0: must be an integer >= 1, or null"),
    "unknown-top-key": (lambda t: [*TINY, "+sede=1"], r"sede: no such key; did you mean seed\?"),
    # --- budget ------------------------------------------------------------------------------------
    "unknown-budget": (lambda t: [*TINY, "budget=3pct"], r"unknown budget '3pct'; choose one of: 0\.1pct, .*sweep"),
    "fraction-0": (lambda t: [*TINY, "budget.fraction=0"], r"budget\.fraction=0\.0: must be a fraction in \(0, 1\]"),
    "fraction-1.5": (lambda t: [*TINY, "budget.fraction=1.5"], r"budget\.fraction=1\.5: must be a fraction"),
    "fraction-neg": (lambda t: [*TINY, "budget.fraction=-1"], r"budget\.fraction=-1\.0: must be a fraction"),
    "fraction-text": (lambda t: [*TINY, "budget.fraction=1pct"], r"budget\.fraction=1pct: must be a number"),
    # --- train -------------------------------------------------------------------------------------
    "steps-zero": (lambda t: [*TINY, "train.max_steps=0"], r"train\.max_steps=0: must be an integer >= 1"),
    "steps-text": (lambda t: [*TINY, "train.max_steps=abc"], r"train\.max_steps=abc: must be an integer"),
    "steps-misspelled": (lambda t: [*TINY, "train.max_stepz=3"],
                         r"train\.max_stepz: no such key; did you mean train\.max_steps\? \(train has: max_steps, "),
    "batch-zero": (lambda t: [*TINY, "train.batch_size=0"], r"train\.batch_size=0: must be an integer >= 1"),
    "accum-zero": (lambda t: [*TINY, "train.grad_accum=0"], r"train\.grad_accum=0: must be an integer >= 1"),
    "max-len-zero": (lambda t: [*TINY, "train.max_len=0"], r"train\.max_len=0: must be an integer >= 2"),
    "schedule-typo": (lambda t: [*TINY, "train.schedule=cosnie"],
                      r"train\.schedule=cosnie: must be one of transformers' schedulers .*: linear, cosine, "),
    "schedule-needs-args": (lambda t: [*TINY, "train.schedule=reduce_lr_on_plateau"],
                            r"train\.schedule=reduce_lr_on_plateau: must be one of"),
    "warmup-ratio-above-1": (lambda t: [*TINY, "train.warmup_ratio=1.5"],
                             r"train\.warmup_ratio=1\.5: must be a number in \[0, 1\]"),
    "warmup-ratio-negative": (lambda t: [*TINY, "train.warmup_ratio=-0.1"], r"train\.warmup_ratio=-0\.1: "),
    "clip-negative": (lambda t: [*TINY, "train.max_grad_norm=-1"],
                      r"train\.max_grad_norm=-1\.0: must be a number > 0, or null \(no clipping\)"),
    "clip-zero": (lambda t: [*TINY, "train.max_grad_norm=0"], r"train\.max_grad_norm=0\.0: must be a number > 0"),
    "beta-one": (lambda t: [*TINY, "train.betas=[0.9,1.0]"],
                 r"train\.betas=\[0\.9,1\.0\]: must be 2 values, each a number in \[0, 1\)"),
    "betas-one-value": (lambda t: [*TINY, "train.betas=[0.9]"], r"train\.betas=\[0\.9\]: must be 2 values"),
    "eps-zero": (lambda t: [*TINY, "train.eps=0"], r"train\.eps=0\.0: must be a number > 0"),
    "eval-every-negative": (lambda t: [*TINY, "train.eval_every=-1"], r"train\.eval_every=-1: must be an integer >= 0"),
    "val-batches-negative": (lambda t: [*TINY, "train.val_batches=-1"], r"train\.val_batches=-1: "),
    "log-every-zero": (lambda t: [*TINY, "train.log_every=0"], r"train\.log_every=0: must be an integer >= 1"),
    "checkpointing-not-bool": (lambda t: [*TINY, "train.gradient_checkpointing=maybe"],
                               r"train\.gradient_checkpointing=maybe: must be true or false"),
    "too-few-examples": (lambda t: [*TINY, "data=local", f"data.path={_records(t, 4)}", "data.val_size=1",
                                    "train.batch_size=8"],
                         r"data=local has 3 training records, fewer than train\.batch_size=8; "),
    # --- method ------------------------------------------------------------------------------------
    "unknown-method": (lambda t: [*TINY, "method=lorra"], r"unknown method 'lorra'; choose one of: corda, dora, full_ft, hft, kasa, lisa, lora"),
    "lr-zero": (lambda t: [*TINY, "method=lora", "method.lr=0"], r"method\.lr=0\.0: must be a number > 0"),
    "lr-negative-ft": (lambda t: [*TINY, "method=full_ft", "method.lr=-1e-5"], r"method\.lr=-1e-05: must be a number > 0"),
    "lr-text": (lambda t: [*TINY, "method=smt", "method.lr=fast"], r"method\.lr=fast: must be a number"),
    "weight-decay-negative": (lambda t: [*TINY, "method=dora", "method.weight_decay=-0.1"],
                              r"method\.weight_decay=-0\.1: must be a number >= 0"),
    "dropout-one": (lambda t: [*TINY, "method=lora", "method.args.lora_dropout=1.0"], r"method\.args\.lora_dropout=1\.0: must be a number in \[0, 1\)"),
    "alpha-zero": (lambda t: [*TINY, "method=lora", "method.scaled_args.lora_alpha=0"],
                   r"method\.scaled_args\.lora_alpha=0\.0: must be a number > 0 \(the ratio lora_alpha / r\)"),
    "targets-empty": (lambda t: [*TINY, "method=lora", "method.target_modules=[]"],
                      r"method\.target_modules=\[\]: must be a non-empty list of names"),
    "targets-unknown": (lambda t: [*TINY, "method=lora", "method.target_modules=[qproj]"],
                        r"method\.target_modules=\['qproj'\] matches no linear layer; choose from"),
    "lora-named-dora": (lambda t: [*TINY, "method=lora", "method.args.use_dora=true"],
                        r"method\.args\.use_dora=true: must be false \(with LoraConfig\) for method=lora; DoRA is method=dora"),
    "unreachable-rank": (lambda t: [*TINY, "method=lora", "budget.fraction=0.05"],
                         r"budget of 160,989 params is unreachable for lora .* valid r 1\.\.32"),
    "smt-block-zero": (lambda t: [*SMT, "method.block_size=0"], r"method\.block_size=0: must be an integer >= 1"),
    "smt-block-too-small": (lambda t: [*SMT, "method.block_size=8"],
                            r"no block size <= method\.block_size=8 divides the eligible matrices \(dimensions "
                            r"\[32, 64\]\); set method\.block_size to at least 16"),
    "smt-block-triton": (lambda t: [*SMT, "method.kernels=triton", "method.block_size=8"],
                         r"method\.block_size=8: must be at least 16 with method\.kernels=triton \(its sizes: "
                         r"16, 32, 64, 128, 256"),
    "smt-warmup-zero": (lambda t: [*SMT, "method.warmup_steps=0"], r"method\.warmup_steps=0: must be an integer >= 1"),
    "smt-warmup-mode": (lambda t: [*SMT, "method.warmup_mode=full"],
                        r"method\.warmup_mode=full: must be one of score_only, update"),
    "smt-warmup-lr": (lambda t: [*SMT, "method.warmup_lr=0"], r"method\.warmup_lr=0\.0: must be a number > 0"),
    "smt-score": (lambda t: [*SMT, "method.score=max"], r"method\.score=max: must be one of abs_mean, mean_abs, l1, l2"),
    "smt-projection-unknown": (lambda t: [*SMT, "method.projections=[q,x]"],
                               r"method\.projections=\[q,x\]: must be a non-empty list without repeats of q, k, v, o"),
    "smt-projection-repeat": (lambda t: [*SMT, "method.projections=[v,v]"], r"method\.projections=\[v,v\]: "),
    "smt-projection-not-list": (lambda t: [*SMT, "method.projections=q"], r"method\.projections=q: must be a list"),
    "smt-selection": (lambda t: [*SMT, "method.selection=random"],
                      r"method\.selection=random: must be one of global, per_matrix, attn_mlp"),
    "smt-attn-share-without-pools": (lambda t: [*SMT, "method.attn_share=0.5"],
                                     r"method\.attn_share=0\.5: must be null unless method\.selection=attn_mlp"),
    "smt-attn-share-one": (lambda t: [*SMT, "method.selection=attn_mlp", "method.attn_share=1.0"],
                           r"method\.attn_share=1\.0: must be a number in \(0, 1\), or null"),
    "smt-kernels": (lambda t: [*SMT, "method.kernels=cuda"], r"method\.kernels=cuda: must be one of auto, triton, torch"),
    "smt-threshold": (lambda t: [*SMT, "method.full_input_threshold=1.5"],
                      r"method\.full_input_threshold=1\.5: must be a number in \[0, 1\]"),
    "smt-activation-update": (lambda t: [*SMT, "method.signal=activation", "method.warmup_mode=update"],
                              r"method\.warmup_mode=update: must be score_only with method\.signal=activation"),
    "smt-signal": (lambda t: [*SMT, "method.signal=hessian"], r"method\.signal=hessian: must be one of gradient, activation"),
    "unknown-experiment": (lambda t: ["experiment=paper/qvk"], r"unknown experiment 'paper/qvk'; choose one of: anatomy/commonsense, paper/attn_mlp, "),
    "smt-over-budget": (lambda t: [*SMT, "budget.fraction=0.01"], r"needs 31 blocks but \['q', 'k', 'v'\] have only 16 blocks of 32x32"),
    # --- model -------------------------------------------------------------------------------------
    "model-hub-kernels-not-bool": (lambda t: [*TINY, "model.hub_kernels=maybe"],
                                   r"model\.hub_kernels=maybe: must be true or false"),
    "unknown-model": (lambda t: ["model=gpt5"], r"unknown model 'gpt5'; choose one of: llama-7b, "),
    "tiny-heads": (lambda t: [*TINY, "model.source.num_attention_heads=3"],
                   r"model\.source\.num_attention_heads=3: must be a divisor of hidden_size=64"),
    "tiny-kv-heads": (lambda t: [*TINY, "model.source.num_key_value_heads=3"],
                      r"model\.source\.num_key_value_heads=3: must be a divisor of num_attention_heads=4 \(GQA\)"),
    "tiny-layers-zero": (lambda t: [*TINY, "model.source.num_hidden_layers=0"],
                         r"model\.source\.num_hidden_layers=0: must be an integer >= 1"),
    "local-model-unset": (lambda t: ["model=local", "device=cpu"], r"config value model\.source\.path_or_id is required"),
    "local-model-missing": (lambda t: ["model=local", "device=cpu", f"model.source.path_or_id={t / 'no_model'}"],
                            r"cannot load model .*no_model.* \(local path, which does not exist; .*\): .* model\.source\.path_or_id="),
    "hub-model-offline": (lambda t: ["model=llama-7b", "device=cpu"],
                          r"cannot load model 'huggyllama/llama-7b' \(hub id, and the hub is unreachable or has no such "
                          r"model; .*\): download it"),
    "source-key-of-another-model": (lambda t: ["device=cpu", "model.source.hidden_size=32"],
                                    r"model\.source\.hidden_size: no such key; \(model\.source has: no keys\)"),
    # --- data --------------------------------------------------------------------------------------
    "unknown-data": (lambda t: [*TINY, "data=alpaca"], r"unknown data 'alpaca'; choose one of: bundled, "),
    "bundled-train-zero": (lambda t: [*TINY, "data.n_train_per_task=0"], r"data\.n_train_per_task=0: must be an integer >= 1"),
    "bundled-task-unknown": (lambda t: [*TINY, "data.tasks=[poetry]"],
                             r"data\.tasks=\[poetry\]: must be a non-empty list without repeats of arith_check, "),
    "bundled-seed": (lambda t: [*TINY, "data.seed=-3"], r"data\.seed=-3: must be an integer in \[0, 2\^32\)"),
    "data-path-unset": (lambda t: [*TINY, "data=local"], r"config value data\.path is required"),
    "missing-data-file": (lambda t: [*TINY, "data=local", f"data.path={t / 'nope.json'}"],
                          r"data file .*nope\.json does not exist"),
    "malformed-jsonl": (lambda t: [*TINY, "data=local", f"data.path={_jsonl_broken(t)}"],
                        r"broken\.jsonl: line 3: malformed JSON"),
    "malformed-json-list": (lambda t: [*TINY, "data=local", f"data.path={_json_list_broken(t)}"],
                            r"broken\.json: line 4 column \d+: malformed JSON"),
    "all-validation": (lambda t: [*TINY, "data=local", f"data.path={_records(t, 3)}", "data.val_size=5"],
                       r"has only 3 records, all used for validation; lower data\.val_size"),
    "val-size-negative": (lambda t: [*TINY, "data=local", f"data.path={_records(t, 3)}", "data.val_size=-1"],
                          r"data\.val_size=-1: must be an integer >= 0"),
    "test-file-without-answers": (lambda t: [*TINY, "data=local", f"data.path={_records(t, 20)}",
                                             "data.val_size=2", f"data.test_path={_no_answer(t)}"],
                                  r"test\.json: record 0: field 'answer' missing"),
    "adapters-folder-without-file": (lambda t: [*TINY, "data=math10k", f"data.path={t}"],
                                     r"data=math10k: no math_10k\.json in "),
    # --- eval --------------------------------------------------------------------------------------
    "unknown-eval": (lambda t: [*TINY, "eval=mmlu"], r"unknown eval 'mmlu'; choose one of: bundled, commonsense"),
    "eval-suite": (lambda t: [*TINY, "eval.suite=poetry"], r"eval\.suite=poetry: must be one of bundled, "),
    "eval-new-tokens": (lambda t: [*TINY, "eval.max_new_tokens=0"], r"eval\.max_new_tokens=0: must be an integer >= 1"),
    "eval-beams": (lambda t: [*TINY, "eval.num_beams=0"], r"eval\.num_beams=0: must be an integer >= 1"),
    "eval-batch": (lambda t: [*TINY, "eval.batch_size=0"], r"eval\.batch_size=0: must be an integer >= 1"),
    "eval-max-examples": (lambda t: [*TINY, "eval.max_examples=0"],
                          r"eval\.max_examples=0: must be an integer >= 1, or null \(no cap\)"),
    "eval-hub": (lambda t: [*TINY, "eval.hub=maybe"], r"eval\.hub=maybe: must be one of optional, required"),
    "eval-merge": (lambda t: [*TINY, "eval.merge=sometimes"], r"eval\.merge=sometimes: must be true or false"),
    "eval-forgetting-tokens": (lambda t: [*TINY, "eval.forgetting.max_tokens=1"],
                               r"eval\.forgetting\.max_tokens=1: must be an integer >= 2"),
    "eval-task-unknown": (lambda t: [*TINY, "eval.tasks=[poetry]"], r"eval\.tasks: unknown task\(s\) \['poetry'\]"),
    "eval-no-data-dir": (lambda t: [*TINY, "eval=commonsense_gen"], r"eval=commonsense_gen reads .*: set eval\.data_dir"),
    "eval-offline-hub": (lambda t: [*TINY, "eval=commonsense"], r"the hub is offline \(HF_HUB_OFFLINE=1\)"),
    # --- logger ------------------------------------------------------------------------------------
    "unknown-logger": (lambda t: [*TINY, "logger=mlflow"], r"unknown logger 'mlflow'; choose one of: none, wandb"),
    "wandb-mode": (lambda t: [*TINY, "logger=wandb", "logger.mode=online2"],
                   r"logger\.mode=online2: must be one of online, offline, disabled, shared, or null"),
    "wandb-project-empty": (lambda t: [*TINY, "logger=wandb", "logger.project=' '"],
                            r"logger\.project= : must be a non-empty string"),
    # --- results -----------------------------------------------------------------------------------
    "results-group-absolute": (lambda t: [*TINY, "results.group=/etc"], r"results\.group=/etc: must be a relative path"),
    "results-group-escapes": (lambda t: [*TINY, "results.group=../x"], r"results\.group=\.\./x: must be a relative path"),
    "results-tag-with-a-dash": (lambda t: [*TINY, "results.tag=a-b"], r"results\.tag=a-b: must be up to 48 letters"),
    "results-flag-not-bool": (lambda t: [*TINY, "results.export=yes please"], r"results\.export=yes please: must be true or false"),
    # --- sweeps ------------------------------------------------------------------------------------
    "sweep-one-unreachable": (lambda t: [*TINY, "method=lora", "budget=sweep"],
                              r"sweep job budget\.fraction=0\.02: budget of 64,396 params is unreachable"),
    "sweep-one-bad-value": (lambda t: ["-m", *TINY, "train.max_steps=2,0"],
                            r"sweep job train\.max_steps=0: train\.max_steps=0: must be an integer >= 1"),
    "sweep-one-bad-seed": (lambda t: ["-m", *TINY, "seed=0,1,-1"], r"sweep job seed=-1: seed=-1: must be an integer"),
    "sweep-one-bad-method": (lambda t: ["-m", *TINY, "method=lora,smt", "method.lr=-1", "budget.fraction=0.01"],
                             r"sweep job method=lora: method\.lr=-1\.0: must be a number > 0"),
    "sweep-no-method-reaches": (lambda t: ["-m", *TINY, "method=lisa,smt", "budget.fraction=0.9"],
                                r"no job of the sweep can meet its budget; first: sweep job method=lisa: skipped: "
                                r"budget of 2,897,798 params is unreachable for lisa"),
}


def run_main(argv, monkeypatch, capsys) -> tuple[int, str]:
    """`python -m smt_bench argv` in this process; training (Hydra's app) must not be reached."""
    def app(plan):
        raise AssertionError("the preflight let this input through to training")

    monkeypatch.setattr(sys, "argv", ["smt_bench", *map(str, argv)])
    monkeypatch.setattr(app_main, "app", app)
    with pytest.raises(SystemExit) as e:
        app_main.main()
    return e.value.code, capsys.readouterr().err


def test_catalogue_has_every_group_and_at_least_40_cases(tmp_path):
    assert len(CASES) >= 40
    keys = " ".join(" ".join(build(tmp_path)) + " " + msg for build, msg in CASES.values())
    for group in ("seed", "device", "threads", "budget", "train", "method", "model", "data", "eval", "logger",
                  "results", "sweep job"):
        assert group in keys, group


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_exit_2_and_nothing_written(case, monkeypatch, capsys, tmp_path, smollm2_path):
    build, message = CASES[case]
    scratch = tmp_path / "in"
    scratch.mkdir()
    results = tmp_path / "results"
    code, err = run_main([*build(scratch), f"results.dir={results}"], monkeypatch, capsys)
    assert code == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("smt-bench: error: "), err
    assert "Traceback" not in err
    assert re.search(message, lines[0].removeprefix("smt-bench: error: ")), lines[0]
    assert not results.exists()


def test_unwritable_results_dir_fails_before_work(monkeypatch, capsys, tmp_path, smollm2_path):
    blocker = Path(_file(tmp_path))  # a file where the results folder would have to be
    code, err = run_main([*TINY, f"results.dir={blocker / 'results'}"], monkeypatch, capsys)
    assert code == 2 and len(err.splitlines()) == 1, err
    assert re.search(rf"results\.dir={re.escape(str(blocker))}/results: cannot write in .*; set results\.dir to a "
                     r"folder you can write to", err), err
    assert blocker.read_text() == "not a folder" and sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def test_good_input_passes_the_preflight(monkeypatch, capsys, tmp_path, smollm2_path):
    """The control: valid input reaches training, and the probe leaves no folder behind."""
    results = tmp_path / "results"
    monkeypatch.setattr(sys, "argv", ["smt_bench", *SMT, f"results.dir={results}"])
    monkeypatch.setattr(app_main, "app", lambda plan: print("trained"))
    app_main.main()
    out = capsys.readouterr()
    assert out.out.strip() == "trained" and out.err == "" and not results.exists()
