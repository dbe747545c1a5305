"""`posttrain_nb.data` tokenises every TRL row format exactly as TRL 1.16's own trainers do, token for token.

Each test builds the TRL trainer (SFTTrainer, DPOTrainer, RewardTrainer) on the same rows and compares its prepared
dataset (or its collator's batch) with ours, on the zoo tokenizer and on a tokenizer with no chat template and no
pad token that adds a BOS token (so the string path's special tokens are exercised too)."""
import copy
import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from posttrain_nb import zoo
from posttrain_nb.data import (prepare_sft, prepare_preferences, collate_preferences, tokenize_preference_row,
                               check_preference_rows, extract_prompt)
from posttrain_nb.core import pad_token_id

SYS = {"role": "system", "content": "You are a careful calculator."}
# the zoo template with TRL's {% generation %} markers around what the assistant writes
GEN_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}<|user|>{{ m['content'] }}"
                "{% elif m['role'] == 'assistant' %}<|assistant|>{% generation %}{{ m['content'] }}<|end|>{% endgeneration %}"
                "{% else %}{{ m['content'] }}{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope="module")
def zoo_pair():
    return zoo.load("base")


@pytest.fixture(scope="module")
def plain_tok(zoo_pair):
    "No chat template, no pad token, and a BOS token the tokenizer prepends."
    from tokenizers.processors import TemplateProcessing
    t = copy.deepcopy(zoo_pair[1]); t.chat_template = None; t.pad_token = None
    t.add_special_tokens({"bos_token": "<|bos|>"})
    t.backend_tokenizer.post_processor = TemplateProcessing(single="<|bos|> $A", pair="<|bos|> $A <|bos|> $B",
                                                            special_tokens=[("<|bos|>", t.bos_token_id)])
    assert t("7")["input_ids"][0] == t.bos_token_id and t.pad_token_id is None and not t.chat_template
    return t


def _u(x): return {"role": "user", "content": x}
def _a(x): return {"role": "assistant", "content": x}

CONV_PC = [{"prompt": [SYS, _u("Tom had 3 apples. He ate 1. How many now?")], "completion": [_a("3-1=2. Answer: 2")]},
           {"prompt": [_u("What is 4+5?"), _a("4+5=9. Answer: 9"), _u("And 9+1?")], "completion": [_a("9+1=10. Answer: 10")]},
           {"prompt": [_u("12-7?")], "completion": [_a("12-7=5. Answer: 5")]}]
MESSAGES = [{"messages": [SYS, _u("What is 4+5?"), _a("4+5=9. Answer: 9"), _u("And 9+1?"), _a("9+1=10. Answer: 10")]},
            {"messages": [_u("12-7?"), _a("12-7=5. Answer: 5")]}]
TEXT_PC = [{"prompt": "Tom had 3 apples. He ate 1. How many now?", "completion": " 3-1=2. Answer: 2"},
           {"prompt": "What is 4+5?", "completion": "4+5=9. Answer: 9"}]
TEXT_LM = [{"text": "Tom had 3 apples. 3-1=2. Answer: 2"}, {"text": "What is 4+5? 4+5=9. Answer: 9"}]
CONV_PREF = [{"prompt": [SYS, _u("What is 4+5?")], "chosen": [_a("4+5=9. Answer: 9")], "rejected": [_a("4+5=8. Answer: 8")]},
             {"prompt": [_u("What is 4+5?"), _a("Answer: 9"), _u("And 9+1?")], "chosen": [_a("9+1=10. Answer: 10")],
              "rejected": [_a("Answer: 11")]}]
IMPLICIT_PREF = [{"chosen": [SYS, _u("What is 4+5?"), _a("4+5=9. Answer: 9")],
                  "rejected": [SYS, _u("What is 4+5?"), _a("4+5=8. Answer: 8")]},
                 {"chosen": [_u("12-7?"), _a("Answer: 5")], "rejected": [_u("12-7?"), _a("12-7=6. Answer: 6")]}]
TEXT_PREF = [{"prompt": "What is 4+5?", "chosen": " 4+5=9. Answer: 9", "rejected": " Answer: 8"},
             {"prompt": "What is 12-7?", "chosen": " Answer: 5", "rejected": " 12-7=6. Answer: 6"}]
TEXT_IMPLICIT = [{"chosen": "What is 12-7? Answer: 5", "rejected": "What is 12-7? Answer: 6"},
                 {"chosen": "Tom had 3 apples. 3-1=2. Answer: 2", "rejected": "Tom had 3 apples. Answer: 4"}]


def _sft_trl(tmp_path, model, tok, rows, **kw):
    from trl import SFTConfig, SFTTrainer
    args = SFTConfig(output_dir=str(tmp_path / "sft"), report_to=[], use_cpu=True, **kw)
    tr = SFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows), processing_class=tok)
    return [(r["input_ids"], [int(l != -100) for l in r["labels"]]) for r in tr.train_dataset]


def _ours_sft(tok, rows, **kw):
    return [(e["input_ids"], e["completion_mask"]) for e in prepare_sft(tok, rows, **kw)]


@pytest.mark.parametrize("rows", [CONV_PC, MESSAGES], ids=["conversational_prompt_completion", "messages"])
def test_sft_conversational_matches_trl(tmp_path, zoo_pair, rows):
    model, tok = zoo_pair
    gen = copy.deepcopy(tok); gen.chat_template = GEN_TEMPLATE  # TRL needs {% generation %} for assistant-only loss
    trl_rows = _sft_trl(tmp_path, model, gen, rows, max_length=None, assistant_only_loss="messages" in rows[0])
    assert _ours_sft(tok, rows) == trl_rows   # ours finds assistant turns on the plain zoo template
    assert _ours_sft(gen, rows) == trl_rows
    if "messages" in rows[0]:  # the system prompt and the earlier turn are in the sequence; both assistant turns train
        ids, mask = _ours_sft(tok, rows)[0]
        assert tok.decode(ids).startswith(SYS["content"])
        assert tok.decode([i for i, m in zip(ids, mask) if m]) == "4+5=9. Answer: 9<|end|>9+1=10. Answer: 10<|end|>"


@pytest.mark.parametrize("which", ["zoo", "plain"])
@pytest.mark.parametrize("rows", [TEXT_PC, TEXT_LM], ids=["text_prompt_completion", "text"])
def test_sft_text_matches_trl(tmp_path, zoo_pair, plain_tok, which, rows):
    tok = zoo_pair[1] if which == "zoo" else plain_tok
    assert _ours_sft(tok, rows) == _sft_trl(tmp_path, zoo_pair[0], tok, rows, max_length=None)


@pytest.mark.parametrize("mode", ["keep_start", "keep_end"])
def test_sft_truncation_matches_trl(tmp_path, zoo_pair, mode):
    model, tok = zoo_pair
    rows = CONV_PC + [{"prompt": [_u("1+1?")], "completion": [_a("1+1=2. " * 8 + "Answer: 2")]}]
    ours = _ours_sft(tok, rows, max_length=40, truncation_mode=mode)
    assert ours == _sft_trl(tmp_path, model, tok, rows, max_length=40, truncation_mode=mode)
    assert max(len(i) for i, _ in ours) == 40


def test_sft_refuses_the_row_trl_drops(tmp_path, zoo_pair):
    "Row 0's prompt (system prompt + question) fills 36 tokens: TRL silently drops it, we refuse it by index."
    model, tok = zoo_pair
    assert len(_sft_trl(tmp_path, model, tok, CONV_PC, max_length=36)) == len(CONV_PC) - 1
    with pytest.raises(ValueError, match="row 0 has no trained token left"): prepare_sft(tok, CONV_PC, max_length=36)


def _dpo_trl(tmp_path, model, tok, rows, **kw):
    from trl import DPOConfig, DPOTrainer
    args = DPOConfig(output_dir=str(tmp_path / "dpo"), report_to=[], use_cpu=True, **kw)
    ref = copy.deepcopy(model)
    return DPOTrainer(model=model, ref_model=ref, args=args, train_dataset=datasets.Dataset.from_list(rows),
                      processing_class=tok)


@pytest.mark.parametrize("rows,which", [(CONV_PREF, "zoo"), (IMPLICIT_PREF, "zoo"), (TEXT_PREF, "zoo"), (TEXT_PREF, "plain"),
                                       (TEXT_IMPLICIT, "plain")],
                         ids=["explicit", "implicit", "text", "text_plain_tokenizer", "text_implicit_plain_tokenizer"])
def test_preference_tokens_match_trl_dpo(tmp_path, zoo_pair, plain_tok, rows, which):
    model, tok = zoo_pair[0], (zoo_pair[1] if which == "zoo" else plain_tok)
    tr = _dpo_trl(tmp_path, copy.deepcopy(model), tok, rows)
    theirs = [{k: r[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for r in tr.train_dataset]
    ours = [tokenize_preference_row(tok, r) for r in check_preference_rows(rows)]
    assert ours == theirs


@pytest.mark.parametrize("mode", ["keep_start", "keep_end"])
def test_preference_truncation_matches_trl_collator(tmp_path, zoo_pair, mode):
    model, tok = zoo_pair
    tr = _dpo_trl(tmp_path, copy.deepcopy(model), tok, CONV_PREF, max_length=40, truncation_mode=mode)
    theirs = tr.data_collator([tr.train_dataset[i] for i in range(len(CONV_PREF))])
    ours = collate_preferences(prepare_preferences(tok, CONV_PREF, max_length=40, truncation_mode=mode), pad_token_id(tok))
    for k, tk in (("input_ids", "input_ids"), ("attention_mask", "attention_mask"), ("response_mask", "completion_mask")):
        assert torch.equal(ours[k], theirs[tk]), k


@pytest.mark.parametrize("rows,which", [(CONV_PREF, "zoo"), (IMPLICIT_PREF, "zoo"), (TEXT_PREF, "plain"), (TEXT_IMPLICIT, "zoo")],
                         ids=["explicit", "implicit", "text_plain_tokenizer", "text_implicit"])
def test_reward_sequences_match_trl(tmp_path, zoo_pair, plain_tok, rows, which):
    "RewardTrainer tokenises prompt+chosen as one conversation; our chosen sequence is the same tokens."
    from transformers import AutoModelForSequenceClassification
    from trl import RewardConfig, RewardTrainer
    tok = zoo_pair[1] if which == "zoo" else plain_tok
    cfg = copy.deepcopy(zoo_pair[0].config); cfg.num_labels = 1; cfg.pad_token_id = pad_token_id(tok)
    rm = AutoModelForSequenceClassification.from_config(cfg)
    tr = RewardTrainer(model=rm, args=RewardConfig(output_dir=str(tmp_path / "rm"), report_to=[], use_cpu=True),
                       train_dataset=datasets.Dataset.from_list(rows), processing_class=tok)
    theirs = [(r["chosen_ids"], r["rejected_ids"]) for r in tr.train_dataset]
    ours = [(e["chosen_ids"], e["rejected_ids"]) for e in prepare_preferences(tok, rows)]
    assert ours == theirs


def test_extract_prompt_matches_trl():
    from trl.data_utils import extract_prompt as trl_extract
    for r in IMPLICIT_PREF + TEXT_IMPLICIT:
        assert {k: v for k, v in extract_prompt(r).items()} == trl_extract(r)


def test_dataset_and_datasetdict(zoo_pair):
    tok = zoo_pair[1]
    ds = datasets.Dataset.from_list(CONV_PC)
    assert _ours_sft(tok, ds) == _ours_sft(tok, CONV_PC)
    dd = datasets.DatasetDict({"train": ds, "test": datasets.Dataset.from_list(CONV_PC[:1])})
    assert _ours_sft(tok, dd) == _ours_sft(tok, CONV_PC)  # the train split by default
    assert len(prepare_sft(tok, dd, split="test")) == 1
    with pytest.raises(ValueError, match="has no 'train' split"): prepare_sft(tok, datasets.DatasetDict({"test": ds}))


def test_train_sft_takes_a_datasetdict_of_any_format(zoo_pair):
    "train_sft's public API: rows in every SFT format, as a DatasetDict; one history dict per optimiser step."
    from posttrain_nb.core import TrainConfig
    from posttrain_nb.train.sft import train_sft
    model, tok = zoo_pair
    for rows in (CONV_PC, MESSAGES, TEXT_PC, TEXT_LM):
        dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)})
        _, res = train_sft(copy.deepcopy(model), tok, dd, TrainConfig(steps=2, batch_size=2, lr=1e-3), lora_r=4,
                           progress=False)
        assert [h["step"] for h in res.history] == [1, 2] and all(h["loss"] > 0 for h in res.history)
