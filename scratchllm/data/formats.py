"""Text formats of task data (shared by pretraining sources and fine-tuning)."""


def alpaca_text(instruction: str, input_text: str, output: str) -> str:
    """An instruction record in the Alpaca prompt format (the book's chapter 7)."""
    prompt = ("Below is an instruction that describes a task. Write a response that "
              f"appropriately completes the request.\n\n### Instruction:\n{instruction}")
    if input_text:
        prompt += f"\n\n### Input:\n{input_text}"
    return f"{prompt}\n\n### Response:\n{output}"
