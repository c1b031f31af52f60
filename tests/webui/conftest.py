import pytest


@pytest.fixture(scope="module")
def peft_ok():
    """transformers >= 5.24 asks for peft >= 0.22 (unreleased); 0.21 has all the LoRA API used here."""
    import peft
    import transformers.integrations.peft as tp
    from packaging.version import Version

    with pytest.MonkeyPatch.context() as mp:
        if Version(peft.__version__) < Version(getattr(tp, "MIN_PEFT_VERSION", "0")):
            mp.setattr(tp, "check_peft_version", lambda min_version: None)
        yield
