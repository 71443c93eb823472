"""Record reference (a) for tests/test_real_model.py: HF transformers on the same GGUF.

Not part of the test suite (torch and transformers are not dependencies). Run by hand in a
separate environment with `pip install torch transformers accelerate gguf`:

    python tests/data/record_hf_reference.py PATH/TO/SmolLM2-135M-Instruct.Q4_1.gguf

transformers dequantizes the GGUF to float32; the script chat-formats each prompt with the model's
template, records the prompt ids, the top-20 last-position logits and 32 greedy tokens (EOS not
honoured, so all 32 positions are compared) into smollm2_hf_reference.json beside this file.
"""

import json
import sys
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about GPU kernels.",
    "Explain in one sentence what a KV cache is.",
    "List three prime numbers.",
]


def main(gguf_path: str) -> None:
    p = Path(gguf_path)
    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(p.parent, gguf_file=p.name)
    model = AutoModelForCausalLM.from_pretrained(
        p.parent, gguf_file=p.name, torch_dtype=torch.float32
    ).eval()
    rows = []
    for prompt in PROMPTS:
        text = tok.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        ids = tok(text, add_special_tokens=False)["input_ids"]
        x = torch.tensor([ids])
        # An explicit all-ones mask: <|im_end|> (id 2) is also the pad id, and generate() would
        # otherwise mask every <|im_end|> inside the prompt.
        mask = torch.ones_like(x)
        with torch.no_grad():
            logits = model(x, attention_mask=mask).logits[0, -1].float().numpy()
            out = model.generate(
                x, attention_mask=mask, max_new_tokens=32, do_sample=False, eos_token_id=None,
                pad_token_id=tok.pad_token_id,
            )  # fmt: skip
        top = np.argsort(-logits)[:20]
        rows.append(
            {
                "prompt": prompt,
                "ids": ids,
                "greedy": out[0, len(ids) :].tolist(),
                "top_ids": top.tolist(),
                "top_logits": [round(float(x), 5) for x in logits[top]],
            }
        )
    (Path(__file__).parent / "smollm2_hf_reference.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main(sys.argv[1])
