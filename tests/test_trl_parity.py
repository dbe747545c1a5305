"`train.dpo.dpo_loss` agrees with TRL's DPOTrainer (sigmoid, ipo, hinge) on the same tokens and models."
import math
import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from posttrain_nb import zoo
from posttrain_nb.core import sequence_logprobs, set_seed
from posttrain_nb.tasks import ArithTask
from posttrain_nb.data import encode_preferences
from posttrain_nb.train.dpo import dpo_loss


def _rows(n=12, seed=0):
    "Conversational preference rows: the gold solution against a corrupted answer or a truncated solution."
    items = ArithTask().sample(n, seed=seed, split="train")
    rows = []
    for i, it in enumerate(items):
        bad = it.solution.replace(f"Answer: {it.answer}", f"Answer: {it.answer + 1 + i}") if i % 2 else it.solution.split(".")[0]
        rows.append({"prompt": [{"role": "user", "content": it.prompt}],
                     "chosen": [{"role": "assistant", "content": it.solution}],
                     "rejected": [{"role": "assistant", "content": bad}]})
    return rows


def _trl_batch_and_loss(tmp_path, loss_type, beta, rows):
    from trl import DPOConfig, DPOTrainer
    policy, tok = zoo.load("teacher")
    ref, _ = zoo.load("base")  # same architecture, different weights: log-ratios are far from 0
    args = DPOConfig(output_dir=str(tmp_path / loss_type), beta=beta, loss_type=loss_type, report_to=[],
                     per_device_train_batch_size=len(rows), max_steps=1, use_cpu=True, dataloader_drop_last=False,
                     seed=0, disable_dropout=True)
    tr = DPOTrainer(model=policy, ref_model=ref, args=args, train_dataset=datasets.Dataset.from_list(rows),
                    processing_class=tok)
    batch = next(iter(tr.get_train_dataloader()))
    tr.model.eval()
    with torch.no_grad():
        loss = tr.compute_loss(tr.model, batch)
    return batch, float(loss), policy, ref, tok


@pytest.mark.parametrize("loss_type,beta", [("sigmoid", 0.1), ("ipo", 0.1), ("hinge", 0.1), ("ipo", 0.7)])
def test_dpo_loss_matches_trl(tmp_path, loss_type, beta):
    set_seed(0)
    rows = _rows()
    batch, trl_loss, policy, ref, tok = _trl_batch_and_loss(tmp_path, loss_type, beta, rows)
    ids, am, cm = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
    avg = loss_type == "ipo"
    with torch.no_grad():
        pc, pr = sequence_logprobs(policy, ids, am, cm, average=avg).chunk(2)
        rc, rr = sequence_logprobs(ref, ids, am, cm, average=avg).chunk(2)
    ours = dpo_loss(pc, pr, rc, rr, beta, loss_type).mean().item()
    assert ours == pytest.approx(trl_loss, rel=1e-5, abs=1e-6)
    if loss_type == "sigmoid": assert abs(ours - math.log(2)) > 1e-2  # the inputs are far from the trivial point


def test_tokenisation_matches_trl(tmp_path):
    "Our [chosen; rejected] encoding of conversational rows gives TRL's tokens and completion mask."
    rows = _rows(6, seed=1)
    batch, _, _, _, tok = _trl_batch_and_loss(tmp_path, "sigmoid", 0.1, rows)
    ours = encode_preferences(tok, rows)
    def rows_of(ids, am, rm):  # (tokens, completion mask) per real row; TRL's loader shuffles, so compare as sorted lists
        return [(tuple(i[a.bool()].tolist()), tuple(r[a.bool()].tolist())) for i, a, r in zip(ids, am, rm)]
    o = rows_of(ours["input_ids"], ours["attention_mask"], ours["response_mask"])
    t = rows_of(batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    n = len(rows)
    assert sorted(o[:n]) == sorted(t[:n]) and sorted(o[n:]) == sorted(t[n:])  # chosen half, rejected half
