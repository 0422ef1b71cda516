"""The memorization audit: its measures against references we did not write, its table on known extractions."""

import difflib
import json
import random

import pytest
from rouge_score import rouge_scorer

from apertus.eval import memorization as M


def test_rouge_l_is_rouge_scores_and_lccs_is_difflibs():
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    rng = random.Random(0)
    for _ in range(200):
        truth = [rng.randrange(12) for _ in range(rng.randint(1, 30))]
        pred = [rng.randrange(12) for _ in range(rng.randint(1, 30))]
        if rng.random() < 0.3:
            pred = truth[: rng.randint(0, len(truth))] + pred
        ours = M.compare(pred, truth)
        words = lambda ids: " ".join(f"t{i}" for i in ids)  # noqa: E731
        assert ours["rouge_l"] == pytest.approx(scorer.score(words(truth), words(pred))["rougeL"].fmeasure)
        match = difflib.SequenceMatcher(None, pred, truth, autojunk=False).find_longest_match(0, len(pred), 0,
                                                                                              len(truth))
        assert ours["lccs"] == pytest.approx(match.size / len(truth))
        prefix = 0
        while prefix < min(len(pred), len(truth)) and pred[prefix] == truth[prefix]:
            prefix += 1
        assert ours["exact_len"] == prefix and ours["exact"] == float(prefix == len(truth))


def test_table_shows_known_extraction_by_exposure():
    """Probes given back verbatim in proportion to their exposures; controls never: the table must say so."""
    rng = random.Random(1)
    probes = [{"id": f"p{i}", "text": "", "exposure": e} for i, e in enumerate([0] * 8 + [1, 4, 16, 64] * 4)]
    truths = [[rng.randrange(1000) for _ in range(32)] for _ in probes]
    kept = {0: 0, 1: 4, 4: 12, 16: 24, 64: 32}  # tokens of the truth reproduced before drifting

    def cont(truth, e):
        return truth[:kept[e]] + [1000 + rng.randrange(1000) for _ in range(32 - kept[e])]

    conts = {"greedy": [cont(t, p["exposure"]) for p, t in zip(probes, truths, strict=True)],
             "nucleus": [cont(t, 0) for t in truths]}
    result = M.score_probes(probes, truths, conts)
    greedy = result["table"]["greedy"]
    assert list(greedy) == ["0", "1", "4", "16", "64"] and greedy["0"]["n"] == 8
    assert [greedy[e]["exact_len"] for e in greedy] == [0, 4, 12, 24, 32]
    assert [greedy[e]["exact"] for e in greedy] == [0, 0, 0, 0, 1]
    assert [round(greedy[e]["rouge_l"], 4) for e in greedy] == [0, 0.125, 0.375, 0.75, 1.0]
    assert all(r["rouge_l"] == 0 for r in result["table"]["nucleus"].values())
    md = M.markdown_table(result["table"], "fake")
    assert "| control | 8 |" in md and "| 64 | 4 | 1.000 ± 0.000 | 100 ± 0 |" in md


def test_probe_prompts_and_bad_probe_files(tmp_path, apertus_tokenizer_json, data_dir):
    from apertus.tokenizer import Tokenizer

    tok = Tokenizer.from_file(apertus_tokenizer_json)
    text = (data_dir / "tinyshakespeare" / "input.txt").read_text()
    probes = [{"id": f"p{i}", "text": text[i * 400:(i + 1) * 400], "exposure": e}
              for i, e in enumerate([0, 0, 1, 4, 16, 64])]
    probes.append({"id": "short", "text": "Too short.", "exposure": 4})
    (tmp_path / "probes.jsonl").write_text("".join(json.dumps(p) + "\n" for p in probes))
    loaded = M.load_probes(tmp_path)  # a dataset directory holding probes.jsonl
    kept, prompts, truths = M.probe_prompts(loaded, tok, prefix=16, suffix=24)
    assert "short" not in [q["id"] for q in kept] and len(kept) == 6
    for q, p, t in zip(kept, prompts, truths, strict=True):
        ids = tok.encode(q["text"], bos=True)
        assert p == ids[:17] and t == ids[17:41]
    (tmp_path / "bad.jsonl").write_text(json.dumps({"id": "x", "text": "a", "exposure": 4}) + "\n")
    with pytest.raises(ValueError, match="no control probes"):
        M.load_probes(tmp_path / "bad.jsonl")
    with pytest.raises(FileNotFoundError, match="probes.jsonl"):
        M.load_probes(tmp_path / "nowhere")


@pytest.mark.slow
def test_audit_command_finds_a_memorized_probe(tmp_path, data_dir):
    """A tiny model trained to recite one probe: `apertus eval memorization` (engine, greedy + nucleus) reports it
    extracted verbatim and the controls not; the greedy continuations are transformers' greedy ones."""
    import dataclasses
    import subprocess
    import sys

    import torch
    import transformers

    from apertus import build_model, preset, save_model
    from apertus.tokenizer import tiny_tokenizer

    tok = tiny_tokenizer(tmp_path / "tok")
    text = (data_dir / "tinyshakespeare" / "input.txt").read_text()
    probes = [{"id": f"p{i}", "text": text[i * 400:(i + 1) * 400], "exposure": e}
              for i, e in enumerate([64, 0, 0, 0, 0, 4])]
    (tmp_path / "probes.jsonl").write_text("".join(json.dumps(p) + "\n" for p in probes))
    cfg = dataclasses.replace(preset("tiny"), vocab_size=2048, hidden_size=64, intermediate_size=128,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    model = build_model(cfg, seed=0)
    ids = torch.tensor([tok.encode(probes[0]["text"], bos=True)[:48]])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        loss = torch.nn.functional.cross_entropy(model(ids[:, :-1])[0], ids[0, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    save_model(model, tmp_path / "m", extra_files={"tokenizer.json": tok.inner.to_str()})
    out = tmp_path / "audit"
    cmd = [sys.executable, "-m", "apertus.cli", "eval", "memorization", str(tmp_path / "m"), "--probes",
           str(tmp_path / "probes.jsonl"), "--prefix", "16", "--suffix", "24", "--out", str(out), "--device", "cpu"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    result = json.loads((out / "memorization.json").read_text())
    greedy = result["table"]["greedy"]
    assert greedy["64"]["exact"] == 1.0 and greedy["64"]["rouge_l"] == 1.0
    assert greedy["0"]["n"] == 4 and greedy["0"]["exact"] == 0.0 and greedy["0"]["rouge_l"] < 0.5
    assert "nucleus" in result["table"] and "| control | 4 |" in proc.stdout
    assert (out / "memorization.png").read_bytes()[:4] == b"\x89PNG"
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    ref.generation_config.eos_token_id = None  # the audit reads on past an end of document, as ignore_eos does
    for q, rec in zip(probes, result["records"], strict=True):
        prompt = tok.encode(q["text"], bos=True)[:17]
        truth = tok.encode(q["text"], bos=False)[16:40]
        with torch.no_grad():
            gen = ref.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False)
        assert rec["greedy"] == M.compare(gen[0, 17:].tolist(), truth)
