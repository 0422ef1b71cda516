"""Evaluation: log-likelihoods against transformers, scoring against known answers, prompts against lm-eval's."""

import json
import math
import random
import shutil
import subprocess
import sys

import pytest
import torch
import transformers

from apertus.eval import suite
from apertus.eval import tasks as T
from apertus.eval.loglik import Scorer, rolling_windows, score_requests
from apertus.tokenizer import Tokenizer
from apertus.util import read_jsonl


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory, apertus_tokenizer_json):
    """A small random ApertusForCausalLM of transformers with the real Apertus vocabulary, saved with its tokenizer."""
    cfg = transformers.ApertusConfig(vocab_size=131072, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                     max_position_embeddings=16384,
                                     rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    torch.manual_seed(0)
    model = transformers.ApertusForCausalLM(cfg).eval()
    with torch.no_grad():  # far from init, so that choices get clearly different scores
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    path = tmp_path_factory.mktemp("hf_tiny")
    model.save_pretrained(path)
    shutil.copy(apertus_tokenizer_json, path / "tokenizer.json")
    return path, model


def hf_loglik(model, ctx, cont):
    with torch.no_grad():  # the logits of the last len(cont) + 1 positions; the final one predicts nothing here
        logits = model(torch.tensor([ctx + cont]), logits_to_keep=len(cont) + 1).logits[0, :-1]
    rows = torch.log_softmax(logits.double(), -1)
    target = torch.tensor(cont)
    return rows.gather(1, target[:, None]).sum().item(), bool((rows.argmax(-1) == target).all())


def mixed_docs(data_dir):
    """Real documents of every multiple-choice task: 2, 2-with-distinct-contexts and 7 choices, several scripts."""
    return (T.xcopa_docs("it", root=data_dir)[:4] + T.xcopa_docs("zh", root=data_dir)[:2]
            + T.xwinograd_docs("jp", root=data_dir)[:3] + T.piqa_docs(data_dir)[:3]
            + T.sib200_docs("deu_Latn", root=data_dir)[:2] + T.sib200_docs("amh_Ethi", root=data_dir)[:1])


def test_choice_loglikelihoods_equal_transformers(hf_checkpoint, data_dir):
    path, ref = hf_checkpoint
    scorer = Scorer.from_pretrained(path, device="cpu", batch_tokens=700, progress=False)
    pairs = [p for d in mixed_docs(data_dir) for p in d.pairs]
    ids = scorer.pair_ids(pairs)
    ours = scorer.loglikelihood(pairs)
    assert len({tuple(c) for c, _ in ids}) < len(ids)  # shared contexts were scored as trees
    for (ctx, cont), (ll, greedy) in zip(ids, ours, strict=True):
        ref_ll, ref_greedy = hf_loglik(ref, ctx, cont)
        assert abs(ll - ref_ll) <= 1e-4, (ll, ref_ll)
        assert greedy == ref_greedy


def test_long_and_truncated_requests_equal_transformers(hf_checkpoint, data_dir):
    """Rolling windows over a whole UDHR text, and contexts cut on the left to max_len, as the harness does."""
    path, ref = hf_checkpoint
    scorer = Scorer.from_pretrained(path, device="cpu", max_len=48, batch_tokens=200, progress=False)
    text = T.udhr_corpus(data_dir)["roh_Latn"][0][:1500]
    tokens = [scorer.bos_id] + scorer.encode([text])[0]
    windows = rolling_windows(tokens, 48, stride=20)
    assert [t for _, c in windows for t in c] == tokens[1:]  # every token predicted exactly once
    [(nll, n)] = scorer.rolling_nll([text], stride=20)
    expected = sum(hf_loglik(ref, ctx[-(48 + 1 - len(c)):], c)[0] for ctx, c in windows)
    assert n == len(tokens) - 1 and abs(-nll - expected) <= 1e-3
    long_ctx = tokens[:200]
    [(ll, _)] = score_requests(scorer.model, [(long_ctx, tokens[200:205])], max_len=48, progress=False)
    assert abs(ll - hf_loglik(ref, long_ctx[-44:], tokens[200:205])[0]) <= 1e-4


def test_rolling_windows_are_lm_evals():
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    tokens = list(range(1, 38))
    for max_len in (1, 4, 8, 36, 50):
        theirs = [make_disjoint_window(w) for w in get_rolling_token_windows(tokens[1:], 1, max_len, 1)]
        ours = rolling_windows(tokens, max_len)
        assert [(list(c), list(x)) for c, x in theirs] == ours


def test_pair_tokenization_is_lm_evals(hf_checkpoint):
    """The context/continuation split of lm-eval's TemplateLM._encode_pair (trailing spaces move right)."""
    from lm_eval.api.model import TemplateLM

    path, _ = hf_checkpoint
    scorer = Scorer.from_pretrained(path, device="cpu", progress=False)

    class Probe(TemplateLM):
        eot_token_id = prefix_token_id = scorer.bos_id

        def tok_encode(self, s, **kw):
            return scorer.encode([s])[0]

        _loglikelihood_tokens = loglikelihood_rolling = generate_until = None

    pairs = [("Question: why?\nAnswer:", " because"), ("Il gatto ", "dorme."), ("猫は", "寝ている"), ("x  ", " y")]
    for (ctx, cont), ours in zip(pairs, scorer.pair_ids(pairs), strict=True):
        c, x = Probe._encode_pair(Probe(), ctx, cont)
        assert ours == ([scorer.bos_id] + c, x)


def test_prompts_are_lm_evals(data_dir):
    from lm_eval.tasks.xcopa import utils as xcopa_utils

    for lang in T.XCOPA_CONNECTORS:
        rows = list(read_jsonl(data_dir / "xcopa" / lang / f"test.{lang}.jsonl"))[:20]
        for row, doc in zip(rows, T.xcopa_docs(lang, root=data_dir), strict=False):
            ctx = getattr(xcopa_utils, f"doc_to_text_{lang}")(row)
            assert doc.pairs == [(ctx, " " + c) for c in xcopa_utils.doc_to_choice(row)]
    # XWinograd as the harness's Muennighoff/xwinograd rows: "_" for the pronoun, option1/option2
    from lm_eval.tasks.xwinograd import utils as xw_utils

    doc = T.xwinograd_docs("en", root=data_dir)[2]
    row = {"sentence": "The trophy doesn't fit into the brown suitcase because _ is too large.",
           "option1": "The trophy", "option2": "suitcase", "answer": "1"}
    assert doc.pairs == [(c, " " + xw_utils.doc_to_target(row)) for c in xw_utils.doc_to_choice(row)]
    assert doc.gold == xw_utils.doc_to_text(row)


def test_task_data(data_dir):
    assert [len(T.xcopa_docs(lang, root=data_dir)) for lang in T.XCOPA_CONNECTORS] == [500] * 11
    sizes = {lang: len(T.xwinograd_docs(lang, root=data_dir)) for lang in T.XWINOGRAD_LANGS}
    assert sizes == {"en": 2325, "fr": 83, "jp": 959, "pt": 263, "ru": 315, "zh": 16}
    assert len(T.piqa_docs(data_dir)) == 1838 and len(T.sib200_langs(data_dir)) == 205
    sib = T.sib200_docs("fra_Latn", root=data_dir)
    assert len(sib) == 204 and all(len(d.pairs) == 7 for d in sib)
    assert len({d.gold for d in sib[:20]}) > 3  # FLORES order: a --limit prefix is not a single topic
    udhr = T.udhr_corpus(data_dir)
    assert len(udhr) > 400 and "Alle Menschen sind frei" in udhr["deu_Latn"][0]
    assert len(T.flores_texts("eng_Latn", root=data_dir)) == 204


def all_mc_subtasks(data_dir):
    names = ["xcopa", "xwinograd", "piqa"] + [f"sib200_{lang}" for lang in ("eng_Latn", "deu_Latn", "zho_Hans")]
    return suite.resolve(names, root=data_dir)


def test_gold_preferring_model_scores_100(data_dir):
    subtasks = all_mc_subtasks(data_dir)
    gold = set()
    for group, _, lang in subtasks.values():
        for d in suite._mc_docs(group, lang, data_dir):
            gold.add(d.pairs[d.gold])
    results = suite.run_mc(lambda pairs: [0.0 if p in gold else -50.0 for p in pairs], subtasks, root=data_dir)
    for name, r in results.items():
        assert (r["acc"], r["acc_norm"], r["acc_bytes"]) == (1.0, 1.0, 1.0), name
    groups = suite.aggregate(results, subtasks)
    assert groups["xwinograd"]["n"] == 3961 and groups["xwinograd"]["acc"] == 1.0


def test_random_model_scores_chance(data_dir):
    subtasks = all_mc_subtasks(data_dir)
    rng = random.Random(0)
    results = suite.run_mc(lambda pairs: [rng.uniform(-30, -1) for _ in pairs], subtasks, root=data_dir)
    groups = suite.aggregate(results, subtasks)
    assert groups["sib200"]["chance"] == pytest.approx(1 / 7) and groups["xcopa"]["chance"] == 0.5
    for name, r in groups.items():
        for metric in ("acc", "acc_norm", "acc_bytes"):
            assert abs(r[metric] - r["chance"]) <= 3 * r[metric + "_stderr"], (name, metric, r)


def test_stderr_formulas_are_lm_evals():
    from lm_eval.api.metrics import mean_stderr, pooled_sample_stderr

    xs = [float(random.Random(1).random() < 0.3) for _ in range(57)]
    assert T.mean_stderr(xs) == pytest.approx(mean_stderr(xs))
    assert suite._pooled_stderr([0.1, 0.02, 0.05], [10, 200, 37]) == pytest.approx(
        pooled_sample_stderr([0.1, 0.02, 0.05], [10, 200, 37]))


def test_bpb_metrics_and_chance():
    texts = ["abcd", "éé"]  # 4 + 4 bytes
    nll = [(4 * math.log(2), 2), (12 * math.log(2), 3)]  # 4 and 12 bits
    r = suite.bpb_metrics(texts, nll, vocab_size=1024)
    assert r["bpb"] == pytest.approx(16 / 8) and r["tokens_per_byte"] == pytest.approx(5 / 8)
    assert r["chance"] == pytest.approx(5 * 10 / 8)  # uniform over 2^10 ids
    assert r["bpb_stderr"] > 0


def test_uniform_network_scores_log_vocab_per_token(hf_checkpoint):
    """A network whose logits are all equal gives every token log(1/V): the scores hold no accidental offsets."""
    path, _ = hf_checkpoint
    scorer = Scorer.from_pretrained(path, device="cpu", progress=False)
    with torch.no_grad():
        scorer.model.lm_head.weight.zero_()
    reqs = [([1, 5, 6], [7]), ([1, 5, 6], [8, 9, 10]), ([1, 2], [3, 4])]
    for (_, cont), (ll, _) in zip(reqs, score_requests(scorer.model, reqs, 64, progress=False), strict=True):
        assert ll == pytest.approx(-len(cont) * math.log(131072), rel=1e-6)


def test_bad_requests_are_named(hf_checkpoint):
    path, _ = hf_checkpoint
    scorer = Scorer.from_pretrained(path, device="cpu", progress=False)
    with pytest.raises(ValueError, match="empty continuation"):
        scorer.loglikelihood([("context", "")])
    with pytest.raises(ValueError, match="exceeds max_len"):
        score_requests(scorer.model, [([1], list(range(5, 80)))], max_len=64, progress=False)
    with pytest.raises(ValueError, match="unknown task"):
        suite.resolve(["hellaswag"])
    with pytest.raises(ValueError, match="unknown language"):
        suite.resolve(["xcopa_xx"])


@pytest.mark.slow
def test_eval_command_writes_json_markdown_and_charts(small_checkpoint, tmp_path):
    path = small_checkpoint
    out = tmp_path / "report"
    cmd = [sys.executable, "-m", "apertus.cli", "eval", str(path), "--tasks",
           "xcopa,xwinograd_fr,piqa,sib200,flores_bpb,udhr_bpb_roh_Latn", "--langs", "it,et,deu_Latn", "--limit", "3",
           "--max-len", "1024",
           "--out", str(out), "--device", "cpu"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    results = json.loads((out / "results.json").read_text())
    assert set(results["tasks"]) == {"xcopa_et", "xcopa_it", "xwinograd_fr", "piqa", "sib200_deu_Latn",
                                     "flores_bpb_deu_Latn", "udhr_bpb_roh_Latn"}
    for name, r in results["tasks"].items():
        assert "chance" in r and r["n"] == 3
        metric = "bpb" if "bpb" in name else "acc"
        assert metric + "_stderr" in r
    assert 0 < results["groups"]["flores_bpb"]["bpb"] < 2 * results["groups"]["flores_bpb"]["chance"]
    md = (out / "results.md").read_text()
    assert "| xcopa | acc (%) |" in md and "| sib200_deu_Latn | acc (%) |" in md and md in proc.stdout
    for chart in ("summary.png", "xcopa.png"):
        assert (out / chart).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert subprocess.run(cmd[:5] + ["--tasks", "nope"], capture_output=True).returncode == 2


def test_tokenizer_must_fit_the_model(hf_checkpoint, tmp_path):
    from apertus.eval.loglik import load_tokenizer

    path, _ = hf_checkpoint
    assert isinstance(load_tokenizer(path), Tokenizer)
    with pytest.raises(ValueError, match="more than the model"):
        load_tokenizer(path, vocab_size=1000)
    with pytest.raises(FileNotFoundError, match="pass --tokenizer"):
        load_tokenizer(tmp_path, vocab_size=1000)


def test_run_eval_on_an_in_memory_model_equals_its_checkpoint(small_checkpoint, tmp_path):
    """The library entry point (what the speedrun calls mid-training): an in-memory model and its tokenizer score
    exactly as its saved directory, the model's training mode is restored, the report and charts are written."""
    from apertus.checkpoint import load_model
    from apertus.eval import run_eval

    tasks = ["xcopa_it", "flores_bpb", "gsm8k"]
    kw = dict(limit=2, langs=["deu_Latn", "ita_Latn"], num_fewshot=1, max_tokens=8, max_len=1024, progress=False)
    from_dir = run_eval(str(small_checkpoint), tasks=tasks, device="cpu", **kw)
    model = load_model(small_checkpoint, dtype="fp32", device="cpu").train()
    tok = Tokenizer.from_file(small_checkpoint)
    out = tmp_path / "report"
    report = run_eval(model, tok, tasks=tasks, out_dir=out, name="step-100", **kw)
    assert model.training
    assert report["model"] == "step-100" and report["config"]["dtype"] == "float32"
    assert set(report["tasks"]) == set(from_dir["tasks"]) == {
        "xcopa_it", "flores_bpb_deu_Latn", "flores_bpb_ita_Latn", "gsm8k"}
    for name, r in report["tasks"].items():
        for key, value in r.items():
            assert value == pytest.approx(from_dir["tasks"][name][key], rel=1e-6, nan_ok=True), (name, key)
    assert report["tasks"]["gsm8k"]["chance"] == 0 and report["tasks"]["xcopa_it"]["chance"] == 0.5
    assert json.loads((out / "results.json").read_text())["tasks"].keys() == report["tasks"].keys()
    for chart in ("flores_bpb.png", "summary.png"):
        assert (out / chart).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "samples.jsonl").exists()
    with pytest.raises(ValueError, match="tokenizer"):
        run_eval(model, None, tasks=["piqa"])


def test_langid_picks_the_language_whose_prompt_explains_the_sentence_best():
    """langid is multiple choice over prompts: the sentence is the same continuation after a prompt in each
    candidate language, and the gold choice is the prompt in the sentence's language. Scored here by a character
    trigram model of each prompt (a likelihood that knows nothing else), it identifies the languages well; with the
    gold index or the prompts mislabelled it could not."""
    import math
    from collections import Counter

    from apertus.eval import suite

    docs = T.langid_docs("deu_Latn")
    assert len(docs) == 204 and {d.gold for d in docs} == {0} and len(docs[0].pairs) == 10
    assert all(cont == docs[0].pairs[0][1] for _, cont in docs[0].pairs)
    assert docs[0].pairs[3][0].startswith(T.flores_texts("eng_Latn", "dev")[0])

    def trigram_loglik(pairs):
        out = []
        for ctx, cont in pairs:
            grams = Counter(ctx[i:i + 3] for i in range(len(ctx) - 2))
            total = sum(grams.values())
            out.append(sum(math.log((grams[cont[i:i + 3]] + 0.1) / (total + 0.1 * 10_000))
                           for i in range(len(cont) - 2)))
        return out

    subtasks = suite.resolve(["langid"])
    assert len(subtasks) == 10
    res = suite.run_mc(trigram_loglik, subtasks, limit=20)
    accs = [r["acc"] for r in res.values()]
    assert all(r["chance"] == pytest.approx(0.1) for r in res.values())
    assert sum(accs) / len(accs) > 0.8, res  # 0.945 here
    two = suite.run_mc(trigram_loglik, suite.resolve(["langid"], langs=["deu", "rus"]), limit=20)
    assert two["langid_rus_Cyrl"]["acc"] == 1.0 and two["langid_deu_Latn"]["chance"] == 0.5
