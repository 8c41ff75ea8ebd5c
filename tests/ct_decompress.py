"""Helper of tests/test_quant_methods.py, run with the python of a separate environment that holds the
compressed-tensors package (the vLLM one): for every FOLDER OUT pair of arguments, decompress every expert
projection of the exported checkpoint FOLDER with the package's own pack-quantized compressor and save the
float32 weights to OUT (safetensors)."""
import json
import sys

from compressed_tensors.compressors import BaseCompressor
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
from safetensors.torch import load_file, save_file

args = sys.argv[1:]
for folder, out in zip(args[::2], args[1::2]):
    cfg = json.load(open(f"{folder}/config.json"))["quantization_config"]
    group = cfg["config_groups"]["group_0"]
    scheme = QuantizationScheme(targets=group["targets"], weights=QuantizationArgs(**group["weights"]))
    comp = BaseCompressor.get_value_from_registry(cfg["format"])
    sd = load_file(f"{folder}/model.safetensors")
    prefixes = sorted({k.rsplit(".", 1)[0] for k in sd if k.endswith(".weight_packed")})
    res = {}
    for p in prefixes:
        local = {k[len(p) + 1:]: v for k, v in sd.items() if k.startswith(p + ".")}
        local["weight_scale"] = local["weight_scale"].float()  # float32 arithmetic, as moekit's reference
        res[p] = comp.decompress(local, scheme)["weight"].float().contiguous()
    save_file(res, out)
