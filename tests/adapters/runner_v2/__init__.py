"""A version-portable Model Runner V2 harness: vLLM's real `GPUModelRunner` bookkeeping on CPU (runner.py), fed
real scheduler outputs (scheduler.py), stepped as execute_model / sample_tokens step it (step.py), for whichever
vLLM this process imports (vllm_env.py: the installed 0.32, or a side venv's 0.33/0.34 from tools/vllm_side.py).

Test modules that use it name themselves in tests/adapters/test_v2_side_versions.py, which runs them again under
each side venv's vLLM.
"""
