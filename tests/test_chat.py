"""`ft chat` on the demo's export: its answers are llama.cpp's own greedy decoding of the same prompt (text, image and
audio through the projector), a conversation carries its turns, and bad input is one clear error each."""

from __future__ import annotations

import ctypes
import shutil
from pathlib import Path

import pytest

from chat.engine import ChatModel, media_parts
from conftest import DEMO_DATA, run_ft, run_ft_in_process

IMAGE = DEMO_DATA / "images" / "heldout_0001.png"
AUDIO = DEMO_DATA / "audio" / "heldout_0013.wav"
QUESTION = "What shape is in the picture?"
TOKENS = 12


def quant(run: Path, qtype: str = "Q8_0") -> Path:
    return run / "gguf" / f"{run.name}-{qtype}.gguf"


def projector(run: Path) -> Path:
    return run / "gguf" / f"{run.name}-mmproj-F16.gguf"


def llama_greedy(gguf: Path, mmproj: Path, prompt: str, media: list[tuple[str, Path]], limit: int) -> list[int]:
    """Greedy decoding through llama-cpp-python's own `Llama` (its eval and sampler), the prompt's media evaluated
    by mtmd one chunk at a time as llama-cpp-python's multimodal chat handler does."""
    from llama_cpp import mtmd_cpp as M

    from eval.runner import load
    from ft.data import load_audio, load_image
    from quantize.llama_lib import llama_cpp as L

    import numpy as np

    llm = load(gguf, 2048)
    params = M.mtmd_context_params_default()
    params.use_gpu, params.print_timings, params.warmup = False, False, False
    context = M.mtmd_init_from_file(str(mmproj).encode(), llm.model, params)
    bitmaps = []
    for kind, path in media:
        if kind == "image":
            pixels = np.ascontiguousarray(np.asarray(load_image(path), dtype=np.uint8))
            bitmaps.append(M.mtmd_bitmap_init(pixels.shape[1], pixels.shape[0],
                                              pixels.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8))))
        else:
            samples = np.ascontiguousarray(load_audio(path), dtype=np.float32)
            bitmaps.append(M.mtmd_bitmap_init_from_audio(len(samples),
                                                         samples.ctypes.data_as(ctypes.POINTER(ctypes.c_float))))
    text = M.mtmd_input_text()
    raw = prompt.replace("<|image|>", "<__media__>").replace("<|audio|>", "<__media__>").encode()
    text.text, text.text_len, text.add_special, text.parse_special = raw, len(raw), False, True
    chunks = M.mtmd_input_chunks_init()
    assert M.mtmd_tokenize(context, chunks, ctypes.byref(text), (M.mtmd_bitmap_p_ctypes * len(bitmaps))(*bitmaps),
                           len(bitmaps)) == 0
    llm.reset()
    for i in range(M.mtmd_input_chunks_size(chunks)):
        chunk = M.mtmd_input_chunks_get(chunks, i)
        if M.mtmd_input_chunk_get_type(chunk) == M.MTMD_INPUT_CHUNK_TYPE_TEXT:
            count = ctypes.c_size_t()
            pointer = M.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(count))
            llm.eval([pointer[j] for j in range(count.value)])
        else:
            end = L.llama_pos(0)
            assert M.mtmd_helper_eval_chunk_single(context, llm._ctx.ctx, chunk, llm.n_tokens, 0, llm.n_batch,
                                                   False, ctypes.byref(end)) == 0
            llm.n_tokens = end.value
    vocab = L.llama_model_get_vocab(llm.model)
    out: list[int] = []
    while len(out) < limit:
        token = llm.sample(top_k=1, temp=0.0, repeat_penalty=1.0)
        if L.llama_vocab_is_eog(vocab, token):
            break
        out.append(token)
        llm.eval([token])
    M.mtmd_input_chunks_free(chunks)
    for bitmap in bitmaps:
        M.mtmd_bitmap_free(bitmap)
    M.mtmd_free(context)
    llm.close()
    return out


def test_prompt_with_image_and_audio_is_llamas_greedy_answer(demo_run: Path) -> None:
    parts = [{"type": "image", "path": str(IMAGE)}, {"type": "audio", "path": str(AUDIO)},
             {"type": "text", "text": QUESTION}]
    messages = [{"role": "user", "content": parts}]
    with ChatModel(quant(demo_run), projector(demo_run)) as model:
        list(model.answer(messages, max_tokens=TOKENS))
        ours, rendered = model.last, model.render(messages)
    expected = llama_greedy(quant(demo_run), projector(demo_run), rendered, media_parts(messages), TOKENS)
    assert ours.tokens == expected
    assert ours.tokens, "no answer at all"

    result = run_ft_in_process("chat", str(demo_run), "--quant", "Q8_0", "--prompt", QUESTION, "--image", str(IMAGE),
                               "--audio", str(AUDIO), "--temperature", "0", "--max-tokens", str(TOKENS))
    assert result.returncode == 0, result.stderr
    assert result.stdout == ours.text + "\n"


def test_the_second_turn_carries_the_first(demo_run: Path) -> None:
    """Two lines typed into `ft chat`: the second answer is the model's answer to the whole conversation."""
    first_question, second_question = "What is 3 + 4?", "Which is larger, 12 or 9?"
    with ChatModel(quant(demo_run)) as model:
        conversation = [{"role": "user", "content": first_question}]
        first = "".join(model.answer(conversation, max_tokens=TOKENS))
        conversation += [{"role": "assistant", "content": first}, {"role": "user", "content": second_question}]
        second = "".join(model.answer(conversation, max_tokens=TOKENS))
        second_prompt = model.detokenize(model.last.prompt_tokens)
    assert first and f"<|turn>model\n{first.strip()}<turn|>\n<|turn>user\n{second_question}" in second_prompt

    result = run_ft("chat", str(demo_run), "--temperature", "0", "--max-tokens", str(TOKENS),
                    input=f"{first_question}\n{second_question}\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{first}\n{second}\n"


@pytest.fixture
def run_without_projector(demo_run: Path, tmp_path: Path) -> Path:
    """A run directory like the demo's whose export has no projector."""
    run = tmp_path / demo_run.name
    (run / "gguf").mkdir(parents=True)
    shutil.copy(demo_run / "recipe.yaml", run / "recipe.yaml")
    (run / "adapter").symlink_to(demo_run / "adapter")
    (run / "gguf" / "Modelfile").symlink_to(demo_run / "gguf" / "Modelfile")
    quant(run).symlink_to(quant(demo_run))
    return run


def test_a_missing_quant_is_one_clear_error(demo_run: Path) -> None:
    result = run_ft_in_process("chat", str(demo_run), "--quant", "IQ2_XXS", "--prompt", "hi")
    assert result.returncode == 2
    assert f"no IQ2_XXS GGUF in {demo_run / 'gguf'}" in result.stderr and "Q8_0" in result.stderr
    assert "Traceback" not in result.stderr


def test_an_image_without_a_projector_is_one_clear_error(run_without_projector: Path) -> None:
    result = run_ft_in_process("chat", str(run_without_projector), "--quant", "Q8_0", "--prompt", "hi", "--image",
                               str(IMAGE))
    assert result.returncode == 2
    assert "no projector" in result.stderr and "Traceback" not in result.stderr


def test_an_unreadable_image_is_one_clear_error(demo_run: Path, tmp_path: Path) -> None:
    bad = tmp_path / "broken.png"
    bad.write_text("not a picture")
    result = run_ft_in_process("chat", str(demo_run), "--prompt", "hi", "--image", str(bad))
    assert result.returncode == 2
    assert f"unreadable image {bad}" in result.stderr and "Traceback" not in result.stderr


def test_adapter_answers_through_transformers(demo_run: Path) -> None:
    """--adapter: the base model with the run's LoRA, greedy through transformers' own chat template and generate."""
    import torch
    from peft import PeftModel

    from ft.tiny import build_tiny

    base, processor = build_tiny()  # its own copy: the LoRA goes onto it
    model = PeftModel.from_pretrained(base, str(demo_run / "adapter")).eval()
    ids = processor.apply_chat_template([{"role": "user", "content": "What is 3 + 4?"}], add_generation_prompt=True,
                                        tokenize=True, return_dict=True, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=TOKENS, do_sample=False)
    expected = processor.tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)

    result = run_ft_in_process("chat", str(demo_run), "--adapter", "--prompt", "What is 3 + 4?", "--temperature", "0",
                               "--max-tokens", str(TOKENS))
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected + "\n"
