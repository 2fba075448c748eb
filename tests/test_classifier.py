"""The judge classifier behind `diffuse eval --classifier-accuracy`."""

import torch

from diffuse import classifier as C
from diffuse.data import load_dataset


def test_judge_learns_digits_and_is_cached():
    judge = C.load_or_train("digits", None, 16, 1, seed=0)      # trained here or by another test file
    assert judge.test_accuracy > 0.9, judge.test_accuracy
    files = sorted(p.name for p in (C.cache_dir() / "classifiers").iterdir())
    assert files == ["digits-16px-1ch-a1-s0.json", "digits-16px-1ch-a1-s0.safetensors"]
    again = C.load_or_train("digits", None, 16, 1, seed=0)      # from the cache: same predictions
    test = load_dataset("digits", split="test")
    assert torch.equal(judge.predict(test.images), again.predict(test.images))
    assert again.test_accuracy == judge.test_accuracy

    real = C.accuracy_by_class(judge, test.images, test.labels)
    assert real["accuracy"] == round(judge.test_accuracy, 4) and len(real["per_class"]) == 10
    # images of the wrong class score near zero: shift every label by one
    wrong = C.accuracy_by_class(judge, test.images, (test.labels + 1) % 10)
    assert wrong["accuracy"] < 0.1
