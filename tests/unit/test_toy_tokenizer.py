"""The toy character tokenizer round-trips through save_pretrained / AutoTokenizer."""

from transformers import AutoTokenizer

from megatron_opd.toy.addition import AdditionProblem, alphabet
from megatron_opd.toy.tokenizer import SPECIAL_TOKENS, save_char_tokenizer


def test_saved_tokenizer_loads_with_autotokenizer(tmp_path):
    save_char_tokenizer(tmp_path, alphabet(3))
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert len(tok) == len(SPECIAL_TOKENS) + len(alphabet(3))
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    assert not tok.chat_template
    p = AdditionProblem(57, 905, 3)
    text = p.prompt + p.teacher_response()
    ids = tok(text)["input_ids"]
    assert len(ids) == len(text)  # one token per character, no special tokens added
    assert tok.decode(ids + [tok.eos_token_id], skip_special_tokens=True) == text
    assert tok.decode(tok("<eos>")["input_ids"]) == "<eos>" and tok("<eos>")["input_ids"] == [1]
    assert tok("z")["input_ids"] == [tok.unk_token_id]
