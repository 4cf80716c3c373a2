from setuptools import find_packages, setup

setup(
    name="meo_fairseq",
    version="0.1.0",
    description="Mixture-of-Experts and MEO (Merging Experts into One) layers for fairseq",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["meo_fairseq", "meo_fairseq.*"]),
    python_requires=">=3.10",
    # torch and fairseq are deliberately not pinned here: see README ("Installing into your own
    # environment"). fairseq comes from `ve-fairseq` installed with --no-deps.
    install_requires=["numpy", "sentencepiece", "sacrebleu", "rouge-score"],
    extras_require={"test": ["pytest"], "plots": ["matplotlib"]},
)
