"""DeepDefense: a defended ML-as-a-service inference server (Lee, Han, Lee, IJCAI-22)."""

__version__ = "0.1.0"
