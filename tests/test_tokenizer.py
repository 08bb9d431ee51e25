"""GPT-2 BPE through tiktoken: round trips, <|endoftext|>, shapes."""

import pytest
import torch

from fastgpt.tokenizer import EOT_ID, encode, get_tokenizer, text_to_token_ids, token_ids_to_text

pytestmark = pytest.mark.usefixtures("tiktoken_available")


def test_round_trip_and_shape():
    text = "Every effort moves you, naïvely — 日本語 too."
    ids = text_to_token_ids(text)
    assert ids.dtype == torch.long and ids.dim() == 2 and ids.shape[0] == 1
    assert token_ids_to_text(ids) == text
    assert token_ids_to_text(ids[0]) == text
    assert token_ids_to_text(ids[0].tolist()) == text
    assert text_to_token_ids("Hello, world").tolist() == [[15496, 11, 995]]  # GPT-2's ids


def test_endoftext_is_allowed_and_is_one_token():
    ids = encode("Hi<|endoftext|>there")
    assert EOT_ID in ids and ids.count(EOT_ID) == 1
    assert get_tokenizer().n_vocab == 50257 == EOT_ID + 1
    assert token_ids_to_text(torch.tensor([[EOT_ID]])) == "<|endoftext|>"
    # other special-looking text is not special
    assert EOT_ID not in encode("<|im_start|>")


def test_empty_and_bad_shapes():
    assert text_to_token_ids("").shape == (1, 0)
    with pytest.raises(ValueError, match="batch of 2"):
        token_ids_to_text(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="shape"):
        token_ids_to_text(torch.zeros(1, 1, 3, dtype=torch.long))


def test_bad_ids_and_text_are_clear_errors():
    with pytest.raises(ValueError, match=r"token id 50257 at index 1 is out of range \[0, 50257\)"):
        token_ids_to_text([1, 50257])
    with pytest.raises(ValueError, match="token id -1 at index 0"):
        token_ids_to_text(torch.tensor([-1, 5]))
    with pytest.raises(TypeError, match=r"not an int: 1\.5"):
        token_ids_to_text([1.5])
    with pytest.raises(TypeError, match="text must be a str, got int"):
        text_to_token_ids(123)
