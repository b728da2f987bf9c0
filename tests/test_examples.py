"""The loss masks of passages and queries (trackstar/examples.py), against masks written out by hand
on a word-level tokenizer whose ids are known: passage = [bos] + text + [eos] with loss on every token
after bos; query = [bos] + prompt + target with loss on the target tokens only, prompt cut on the left."""

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from trackstar.data.examples import collate, pad_token_id, passage_example, per_example_loss, query_example

VOCAB = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<unk>": 3, "a": 4, "b": 5, "c": 6, "d": 7, "e": 8}


def word_tokenizer(bos: bool = True) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel(VOCAB, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = {"bos_token": "<bos>"} if bos else {}
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>", **specials)


def test_passage_loss_on_every_token_after_bos():
    ex = passage_example(word_tokenizer(), "a b c", max_length=16)
    assert ex.input_ids == [1, 4, 5, 6, 2]
    assert ex.loss_mask == [0, 1, 1, 1, 1]  # a, b, c and eos are predicted; bos is not
    assert not ex.truncated
    cut = passage_example(word_tokenizer(), "a b c", max_length=3)  # cut on the right
    assert (cut.input_ids, cut.loss_mask, cut.truncated) == ([1, 4, 5], [0, 1, 1], True)


def test_passage_without_bos_token_never_counts_the_first_token():
    ex = passage_example(word_tokenizer(bos=False), "a b c", max_length=16)
    assert ex.input_ids == [4, 5, 6, 2]
    assert ex.loss_mask == [0, 1, 1, 1]


def test_query_loss_on_target_tokens_only():
    ex = query_example(word_tokenizer(), "a b c", " d e", max_length=16)
    assert ex.input_ids == [1, 4, 5, 6, 7, 8]
    assert ex.loss_mask == [0, 0, 0, 0, 1, 1]
    assert not ex.truncated


def test_query_prompt_is_truncated_from_the_left():
    ex = query_example(word_tokenizer(), "a b c", " d e", max_length=5)  # room for 2 prompt tokens
    assert ex.input_ids == [1, 5, 6, 7, 8]  # "a" dropped, the words next to the target kept
    assert ex.loss_mask == [0, 0, 0, 1, 1]
    assert ex.truncated
    with pytest.raises(ValueError, match="does not fit in max_length=3"):
        query_example(word_tokenizer(), "a b c", " d e", max_length=3)
    with pytest.raises(ValueError, match="tokenizes to nothing"):
        query_example(word_tokenizer(), "a b c", " ", max_length=16)


def test_masked_loss_sums_the_marked_tokens_only():
    """per_example_loss counts position t when loss_mask[t] = 1, predicted from the logits at t - 1;
    padded positions (collate) count nothing."""
    tok = word_tokenizer()
    exs = [query_example(tok, "a b c", " d e", 16), passage_example(tok, "e d", 16)]
    batch = collate(exs, pad_token_id(tok))
    assert batch["loss_mask"].tolist() == [[0, 0, 0, 0, 1, 1], [0, 1, 1, 1, 0, 0]]
    logits = torch.randn(2, 6, len(VOCAB), generator=torch.Generator().manual_seed(0))
    got = per_example_loss(logits, batch["input_ids"], batch["loss_mask"])
    lp = torch.log_softmax(logits, dim=-1)
    want = [-(lp[0, 3, 7] + lp[0, 4, 8]), -(lp[1, 0, 8] + lp[1, 1, 7] + lp[1, 2, 2])]
    torch.testing.assert_close(got, torch.stack(want))
