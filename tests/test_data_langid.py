"""Language ID on FLORES-200 sentences (SIB-200 test split, 205 varieties): py3langid (ships in its PyPI package)
per language, and the fastText plug-in path with a model trained here on the FLORES dev split."""


import pytest

from apertus.data.langid import LangID, macro, same_language


def flores(data_dir, split, per_lang=None):
    out = {}
    for f in sorted((data_dir / "sib200" / "annotated").glob(f"*/{split}.tsv")):
        rows = [line.split("\t")[2] for line in f.read_text(encoding="utf-8").splitlines()[1:] if line.count("\t") == 2]
        out[f.parent.name] = rows[:per_lang]
    return out


def accuracy(lid, data):
    return {lang: sum(same_language(lid.predict(s)[0], lang) for s in sents) / len(sents)
            for lang, sents in data.items()}


def report(name, acc, supported):
    sup = {k: v for k, v in acc.items() if k in supported}
    mean = sum(sup.values()) / len(sup)
    print(f"\n{name}: {len(sup)} of {len(acc)} FLORES varieties in its label set, mean accuracy {mean:.3f}")
    print("  " + " ".join(f"{k}={v:.2f}" for k, v in sorted(acc.items())))
    return mean


def test_py3langid_on_flores(data_dir):
    lid = LangID()
    data = flores(data_dir, "test", per_lang=100)
    assert len(data) >= 200
    acc = accuracy(lid, data)
    labels = {macro(x) for x in lid.model.nb_classes}
    supported = {lang for lang in data if macro(lang) in labels}
    mean = report("py3langid", acc, supported)
    assert len(supported) >= 90 and mean >= 0.85
    assert acc["eng_Latn"] >= 0.95 and acc["deu_Latn"] >= 0.95 and acc["zho_Hans"] >= 0.9


@pytest.mark.slow
def test_fasttext_model_by_path(data_dir, tmp_path):
    fasttext = pytest.importorskip("fasttext")
    train = tmp_path / "train.txt"
    langs = sorted(flores(data_dir, "dev"))[::5]  # 41 varieties keep training to seconds on 2 cores
    with open(train, "w", encoding="utf-8") as f:
        for lang, sents in flores(data_dir, "dev").items():
            if lang not in langs:
                continue
            for s in sents:
                f.write(f"__label__{lang} {' '.join(s.split())}\n")
    model = fasttext.train_supervised(str(train), minn=2, maxn=5, dim=32, epoch=25, lr=1.0, thread=2, seed=0,
                                      verbose=0)
    path = tmp_path / "flores_lid.bin"
    model.save_model(str(path))
    lid = LangID("fasttext", str(path))
    data = {k: v for k, v in flores(data_dir, "test", per_lang=50).items() if k in langs}
    acc = accuracy(lid, data)
    mean = report("fastText trained on FLORES dev", acc, set(data))
    assert mean >= 0.9
    assert lid.predict(data["deu_Latn"][0] if "deu_Latn" in data else data[langs[0]][0])[0] in langs


def test_plugin_errors(tmp_path):
    with pytest.raises(ValueError, match="model"):
        LangID("fasttext")
    with pytest.raises(FileNotFoundError):
        LangID("fasttext", str(tmp_path / "none.bin"))
    with pytest.raises(ValueError):
        LangID("cld3")
