"""Learning works: a small Apertus on real text (tinyshakespeare tokenised with the Apertus tokenizer) gets a
held-out loss clearly below the unigram baseline within a minute of CPU."""

import pytest
import torch
import train_data

from apertus.train.distributed import Dist
from apertus.train.pretrain import pretrain
from apertus.train.recipe import parse_recipe


@pytest.mark.slow
def test_validation_loss_falls_clearly_below_the_unigram_baseline(tmp_path):
    c = train_data.corpus(2048)  # the 2044 most frequent tokens; the rest are <unk>
    val = train_data.val_batches(128, 8, 4, langs=("en",), c=c)
    # the unigram model of the training tokens (add-one smoothed): what a model that ignores context achieves
    counts = torch.bincount(torch.tensor([t for d in c.train for t in d[1:]]), minlength=c.vocab_size).double() + 1
    logp = (counts / counts.sum()).log()
    unigram = torch.cat([-logp[b["labels"][b["loss_mask"]]] for b in val["en"]]).mean().item()
    steps = 60
    table = train_data.tiny_recipe(steps=steps, seq_len=128, global_batch_tokens=128 * 8, micro_batch=8,
                                   goldfish_k=0)
    table["model"].update(vocab_size=c.vocab_size, hidden_size=128, intermediate_size=336)
    table["optim"].update(lr=5e-3, min_lr=5e-4, t_alpha=steps, t_beta3=steps)
    table["schedule"] = {"warmup_tokens": 128 * 8 * 6, "cooldown_tokens": 128 * 8 * 12}
    table["eval"] = {"every": 30}
    result = pretrain(parse_recipe(table), tmp_path, Dist(), make_loader=train_data.make_loader(docs=c.train),
                      val_batches=val, token_bytes=c.token_bytes)
    assert result["val/en/loss"] < unigram - 0.25, (result["val/en/loss"], unigram)
    assert 0 < result["val/en/bpb"] < 4
    assert (tmp_path / "loss.png").stat().st_size > 10_000
