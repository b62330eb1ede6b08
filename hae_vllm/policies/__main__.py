"""``python -m hae_vllm.policies``: list the eviction methods."""

from hae_vllm.config import methods

if __name__ == "__main__":
    table = methods()
    width = max(map(len, table))
    for name, desc in table.items():
        print(f"{name:<{width}}  {desc}")
