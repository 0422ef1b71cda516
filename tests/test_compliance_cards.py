"""`apertus card` on a tiny end-to-end run (data build -> a few training steps on the tiny model -> HF checkpoint ->
an evaluation result): the three documents are complete, every number in their tables is in the trace, every trace
entry resolves to the manifest field it names, and several numbers are checked against the manifests directly."""

import json
import re
import subprocess
import sys

import pytest
import torch
import yaml
from compliance_helpers import build_dataset

from apertus.checkpoint import save_model
from apertus.compliance.cards import resolve_pointer
from apertus.compliance.manifest import record_data_build, write_run_manifest
from apertus.compliance.optout import apply_optout
from apertus.config import preset
from apertus.data.loader import PackedLoader
from apertus.model import build_model, document_mask


def _tiny_pretrain(dataset, run, steps=4):
    cfg = preset("tiny")
    cfg.num_hidden_layers, cfg.vocab_size = 2, 640
    model = build_model(cfg, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    loader = PackedLoader(dataset, seq_len=64, batch_size=4, seed=0)
    tokens, loss = 0, None
    for _ in range(steps):
        b = next(loader)
        pos = b["position_ids"]
        ce = torch.nn.functional.cross_entropy(model(b["input_ids"], position_ids=pos, attn_mask=document_mask(pos))
                                               .flatten(0, 1), b["labels"].flatten(), reduction="none")
        loss = (ce * b["loss_mask"].flatten()).sum() / b["loss_mask"].sum()
        loss.backward()
        opt.step()
        opt.zero_grad()
        tokens += b["input_ids"].numel()
    save_model(model, run / "hf")
    config = {"model": cfg.to_hf_dict("float32"), "data": {"dataset": str(dataset)},
              "train": {"seq_len": 64, "micro_batch": 4, "steps": steps, "seed": 0, "goldfish_k": 50,
                        "goldfish_h": 50}}
    write_run_manifest(run, "pretrain", config, {"train": 0, "loader": 0}, ["hf"], tokens=tokens,
                       flops=tokens * cfg.flops_per_token(64), wall_time=1.5, datasets=[dataset],
                       metrics={"parameters": model.num_params(), "loss": loss.item()})
    return model


@pytest.fixture(scope="module")
def e2e(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    data = build_dataset(root / "src")
    record_data_build(data)
    run = root / "run"
    (run / "pretrain").mkdir(parents=True)
    data_link = run / "data"
    data_link.symlink_to(data, target_is_directory=True)
    model = _tiny_pretrain(data, run / "pretrain")
    (run / "eval").mkdir()
    (run / "eval" / "results.json").write_text(json.dumps({  # the layout of apertus.eval's results.json
        "model": str(run / "pretrain" / "hf"), "groups": {},
        "tasks": {"xcopa_it": {"acc": 0.52, "acc_stderr": 0.0223, "chance": 0.5, "n": 500},
                  "flores_bpb_deu": {"bpb": 2.7513, "chance": None, "n": 997}}}))
    r = subprocess.run([sys.executable, "-m", "apertus.cli", "card", str(run), "--provider", "Test provider"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return run, data, model


def _tables(md):
    """Cells of every markdown table row (header and separator rows skipped)."""
    cells = []
    for block in re.split(r"\n(?!\|)", md):
        rows = [line for line in block.splitlines() if line.startswith("|")]
        for line in rows[2:]:
            cells += [c.strip() for c in line.strip("|").split("|")]
    return cells


def test_cards_complete(e2e):
    run, data, _ = e2e
    readme = (run / "card" / "README.md").read_text()
    fm = yaml.safe_load(readme.split("---\n")[1])
    assert fm["license"] == "apache-2.0" and fm["language"] == ["eng"] and fm["datasets"] == ["compliance-fixture"]
    assert fm["pipeline_tag"] == "text-generation" and fm["library_name"] == "transformers"
    assert fm["model-index"][0]["results"][0]["metrics"][0] == {"type": "acc", "value": 0.52, "name": "xcopa_it acc"}
    for section in ("## Model", "## Training", "## Training data", "## Evaluation", "## Compliance",
                    "## Reproducibility", "## Limitations"):
        assert section in readme
    card = (run / "card" / "DATA_CARD.md").read_text()
    for section in ("## Sources", "## Processing", "## Filter funnel per source", "## Filter funnel per language",
                    "## Curriculum", "## Opt-out and removals"):
        assert section in card
    assert "| web | web | CC BY 4.0 |" in card and "| books | web | public domain |" in card
    eu = (run / "card" / "EU_PUBLIC_SUMMARY.md").read_text()
    for section in ("### 1.1 Provider", "### 1.2 Model", "### 1.3 Modalities", "### 2.1 Publicly available",
                    "### 2.2 Private", "### 2.3 Data crawled", "### 2.4 User data", "### 2.5 Synthetic",
                    "### 3.1 Respect of reservations", "### 3.2 Removal of illegal"):
        assert section in eu
    assert "Provider: Test provider" in eu and "less than 1 billion tokens" in eu
    assert "not recorded" not in readme.split("## Training data")[0]  # every field of this run is recorded


def test_every_number_traces_to_a_manifest_field(e2e):
    run, data, _ = e2e
    trace = json.loads((run / "card" / "card_trace.json").read_text())["entries"]
    texts = {e["text"] for e in trace}
    docs = "".join((run / "card" / f).read_text() for f in ("README.md", "DATA_CARD.md", "EU_PUBLIC_SUMMARY.md"))
    for e in trace:
        assert e["text"] in docs
        path = run / e["file"] if not e["file"].startswith("/") else e["file"]
        if "pointer" in e:
            assert resolve_pointer(json.loads(open(path).read()), e["pointer"]) == e["value"], e
    for name in ("README.md", "DATA_CARD.md"):
        for cell in _tables((run / "card" / name).read_text()):
            if re.fullmatch(r"[\d,.eE+-]+", cell) and cell != "-":
                assert cell in texts or cell == "0", (name, cell)  # "0": an event absent for that language


def test_numbers_match_the_manifests(e2e):
    run, data, model = e2e
    man = json.loads((data / "manifest.json").read_text())
    pre = json.loads((run / "pretrain" / "run.json").read_text())
    card = (run / "card" / "DATA_CARD.md").read_text()
    web = man["sources"]["web"]
    assert f"| web | web | CC BY 4.0 | {web['train']['docs']:,} | {web['train']['tokens']:,} |" in card
    pii = man["funnel"]["by_source"]["web"]["pii:email"]
    assert f"| web | pii:email | {pii['docs']:,} | {pii['tokens']:,} | {pii['items']:,} |" in card
    assert f"| web-first | {man['stages'][0]['tokens']:,} | web 1 |" in card
    readme = (run / "card" / "README.md").read_text()
    assert f"| parameters | {model.num_params():,} |" in readme
    assert f"| `pretrain` | pretrain | {pre['tokens']:,} | {pre['flops']:.3g} |" in readme
    assert f"| layers | {model.config.num_hidden_layers} |" in readme
    assert "| xcopa_it | acc | 0.5200 | 0.0223 | 500 |" in readme
    assert "k = 50, h = 50" in readme
    assert pre["artifacts"]["hf/model.safetensors"]["sha256"] in readme


def test_card_reports_retrospective_removal(e2e, tmp_path):
    import shutil

    run, data, _ = e2e
    d = tmp_path / "data"
    shutil.copytree(data, d)
    rep = apply_optout(d, domains=["gpt.example"])
    subprocess.run([sys.executable, "-m", "apertus.cli", "card", str(d), "--out", str(tmp_path / "card")],
                   check=True, capture_output=True)
    card = (tmp_path / "card" / "DATA_CARD.md").read_text()
    assert f"retrospective removal {rep['time']}: {rep['removed']['docs']:,} documents" in card
    assert f"| web | optout_retro:domain | {rep['removed']['docs']:,} |" in card
    eu = (tmp_path / "card" / "EU_PUBLIC_SUMMARY.md").read_text()
    assert f"retrospective removal {rep['time']}: {rep['removed']['docs']:,} documents" in eu
