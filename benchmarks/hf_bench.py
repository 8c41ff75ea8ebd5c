"""Forward + backward time of transformers MoE models with the eager, grouped_mm and moekit experts
implementations: a thin wrapper of :mod:`moekit.hf.bench` (also ``moekit bench --hf``)."""
import sys

from moekit.hf.bench import main

if __name__ == "__main__":
    sys.exit(main())
