"""Private inference under a real two-party protocol (SecretFlow SPU), run by tools/pi_measure.py.

These modules import jax and spu and run ONLY in the separate PI environment (.venv-pi, made by
scripts/setup_pi.sh); nothing in the training stack imports them. The hand-off is a folded
Hugging Face export in safetensors (tools/convert_to_hf.py --fold).

    jax_model.py     the export read into numpy, the forward of one output token as named stages
    spu_session.py   two SPU parties in one process that keep their shares between stages and
                     report each stage's bytes, send actions and time
"""
