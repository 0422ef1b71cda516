"""The lm-evaluation-harness adapter: lm-eval's own evaluator, custom YAML tasks over local files (no hub)."""

import json
import os
import subprocess
import sys

import pytest
import torch
import transformers

from apertus.eval import suite
from apertus.eval import tasks as T
from apertus.eval.loglik import Scorer
from apertus.util import read_jsonl

os.environ["HF_DATASETS_OFFLINE"] = os.environ["HF_HUB_OFFLINE"] = "1"  # the tasks read local files only

XCOPA_YAML = """task: xcopa_it_local
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: multiple_choice
test_split: test
doc_to_text: "{{{{premise.strip()[:-1]}}}} {{{{'perché' if question == 'cause' else 'quindi'}}}}"
doc_to_target: label
doc_to_choice: "{{{{[choice1[0]|lower + choice1[1:], choice2[0]|lower + choice2[1:]]}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
"""
FLORES_YAML = """task: flores_deu_local
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: loglikelihood_rolling
test_split: test
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: bits_per_byte
"""
GSM8K_YAML = """task: gsm8k_local
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: generate_until
test_split: test
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["Question:", "\\n\\n"]
  do_sample: false
  max_gen_toks: 20
metric_list:
  - metric: exact_match
"""


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory, data_dir):
    """Three custom tasks: XCOPA-it as the harness prompts it, bits-per-byte on FLORES German sentences and a
    generative GSM8K."""
    d = tmp_path_factory.mktemp("lm_eval_tasks")
    rows = list(read_jsonl(data_dir / "xcopa" / "it" / "test.it.jsonl"))[:16]
    (d / "xcopa_it.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    texts = T.flores_texts("deu_Latn", root=data_dir)[:12]
    (d / "flores.jsonl").write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts))
    rows = list(read_jsonl(data_dir / "gsm8k" / "test.jsonl"))[:3]
    (d / "gsm8k.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    (d / "gsm8k_local.yaml").write_text(GSM8K_YAML.format(data=d / "gsm8k.jsonl"))
    (d / "xcopa_it_local.yaml").write_text(XCOPA_YAML.format(data=d / "xcopa_it.jsonl"))
    (d / "flores_deu_local.yaml").write_text(FLORES_YAML.format(data=d / "flores.jsonl"))
    return d


def test_lm_eval_scores_equal_ours(small_checkpoint, task_dir, data_dir):
    import lm_eval
    from lm_eval.tasks import TaskManager

    import apertus.eval.harness  # noqa: F401  (registers the model)

    out = lm_eval.simple_evaluate(model="apertus", model_args=f"pretrained={small_checkpoint},device=cpu",
                                  tasks=["xcopa_it_local", "flores_deu_local", "gsm8k_local"], log_samples=True,
                                  task_manager=TaskManager(include_path=str(task_dir)))
    scorer = Scorer.from_pretrained(small_checkpoint, device="cpu", progress=False)
    # multiple choice: lm-eval built the requests from the YAML template; the same documents through our suite
    docs = T.xcopa_docs("it", root=data_dir)[:16]
    ours = [[ll for ll, _ in scorer.loglikelihood(d.pairs)] for d in docs]
    samples = sorted(out["samples"]["xcopa_it_local"], key=lambda s: s["doc_id"])
    for s, lls in zip(samples, ours, strict=True):
        assert [r[0][0] for r in s["resps"]] == pytest.approx(lls, abs=1e-4)  # fp32, other batch layout
    mine = T.mc_metrics(docs, ours)
    theirs = out["results"]["xcopa_it_local"]
    assert theirs["acc,none"] == mine["acc"] and theirs["acc_norm,none"] == mine["acc_norm"]
    assert theirs["acc_stderr,none"] == pytest.approx(mine["acc_stderr"])
    # loglikelihood_rolling: lm-eval's bits_per_byte equals ours on the same sentences
    texts = T.flores_texts("deu_Latn", root=data_dir)[:12]
    bpb = suite.bpb_metrics(texts, scorer.rolling_nll(texts), 2048)["bpb"]
    assert out["results"]["flores_deu_local"]["bits_per_byte,none"] == pytest.approx(bpb, rel=1e-6)
    # generate_until (through the engine): transformers' greedy continuation, cut at the `until` strings
    ref = transformers.AutoModelForCausalLM.from_pretrained(small_checkpoint).eval()
    gsm = sorted(out["samples"]["gsm8k_local"], key=lambda s: s["doc_id"])
    assert len(gsm) == 3 and all(s["resps"][0][0] for s in gsm)
    for s in gsm:
        ids = scorer.tokenizer.encode(f"Question: {s['doc']['question']}\nAnswer:", bos=True)
        with torch.no_grad():
            gen = ref.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False,
                               eos_token_id=scorer.eos_id)[0, len(ids):]
        text = scorer.tokenizer.decode(gen.tolist(), skip_special_tokens=True).split("Question:")[0].split("\n\n")[0]
        assert s["resps"][0][0] == text


@pytest.mark.slow
def test_plain_lm_eval_command_finds_apertus(small_checkpoint, task_dir, tmp_path):
    """`apertus eval lm-eval-hook --site-dir D` then the unmodified lm_eval command line, with D as a site directory
    (site.addsitedir runs its .pth files exactly as interpreter start-up does for site-packages)."""
    site_dir = tmp_path / "site"
    cli = [sys.executable, "-m", "apertus.cli", "eval", "lm-eval-hook", "--site-dir", str(site_dir)]
    assert subprocess.run(cli, capture_output=True).returncode == 0
    assert (site_dir / "apertus-lm-eval.pth").read_text() == "import apertus_lm_eval_hook\n"
    startup = f"import site, sys; site.addsitedir({str(site_dir)!r}); "
    cheap = startup + "assert 'apertus_lm_eval_hook' in sys.modules and 'apertus' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", cheap]).returncode == 0  # the hook imports neither apertus nor torch
    run = startup + "from lm_eval.__main__ import cli_evaluate; sys.argv[0] = 'lm_eval'; cli_evaluate()"
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-c", run, "--model", "apertus", "--model_args",
                           f"pretrained={small_checkpoint}", "--tasks", "xcopa_it_local", "--include_path",
                           str(task_dir), "--output_path", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [result] = list(out.rglob("results_*.json"))
    acc = json.loads(result.read_text())["results"]["xcopa_it_local"]["acc,none"]
    assert 0 <= acc <= 1 and "xcopa_it_local" in proc.stdout
    # without the hook, lm_eval's registry (what the command looks --model up in) does not know the name; checked
    # on the registry itself because a second lm_eval command would index every bundled task again (slow)
    lookup = "from lm_eval.api.registry import get_model; get_model('apertus')"
    proc = subprocess.run([sys.executable, "-c", lookup], capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0 and "apertus" in proc.stderr
    proc = subprocess.run([sys.executable, "-c", startup + lookup], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    subprocess.run(cli + ["--uninstall"], check=True, capture_output=True)
    assert not any(site_dir.iterdir())
