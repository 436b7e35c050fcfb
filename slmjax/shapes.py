"""The one legend of shape letters: a tensor's name ends in the letters of its axes (`x_BTD`, `w_up_EDF`).

Every module uses these letters with these meanings and no others, so `C` is the expert capacity everywhere
and a name can be read without opening the module that made it (nanodo's convention, extended to MoE and MLA).
A norm's gain and bias are `scale` and `bias` with the width of what they normalise (flax's own names): a Norm
is shared by widths D, Z, H * Z, I and J. `tests/test_shapes.py` checks every shape suffix in slmjax/.
"""

LEGEND: dict[str, str] = {
    'A': 'assignments per token (top_k)',
    'B': 'batch: sequences',
    'C': 'expert capacity: slots per expert per group',
    'D': 'd_model: the residual stream width',
    'E': 'experts',
    'F': 'FFN hidden width (a dense FFN or one expert)',
    'G': 'dispatch groups',
    'H': 'query heads',
    'I': 'MLA query latent rank (q_lora_rank)',
    'J': 'MLA key/value latent rank (kv_lora_rank)',
    'K': 'key/value heads',
    'L': 'layers',
    'M': 'rows of one expert buffer (or of one block of it)',
    'N': 'rows of any flattened axis',
    'O': 'MLA q/k width of one head: Z + R',
    'P': 'gate and up side by side: 2F',
    'Q': 'query heads per key/value head: H = K * Q',
    'R': 'rotary width per head',
    'S': 'tokens per dispatch group',
    'T': 'time: query positions',
    'U': 'time: key positions',
    'V': 'vocabulary',
    'W': 'rows of one tile of grouped matmuls',
    'X': 'tokens: B * T flattened',
    'Y': 'value width per head',
    'Z': 'q/k width per head (head_dim; MLA: its part without rotary)',
}
