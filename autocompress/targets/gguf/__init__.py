"""llama.cpp's GGUF as a deployment target, one module per job:

- `blocks`: llama.cpp's block quantizers, byte for byte (a leaf: numpy, torch and the gguf package only);
- `quantize`: the same blocks through llama.cpp's own `ggml_quantize_chunk` where llama-cpp-python is installed
  (else through `blocks`), rows split across workers;
- `presets`: llama.cpp's quantization presets, the type each tensor takes under each;
- `preset_sizes`: a size limit named by preset (`budget: {size: q4_k_m}`), the bytes of that preset's file;
- `file`: the GGUF file of a model, its exact layout (bytes from shapes alone) and its writer;
- `weights`: GGUF tensor types as the levels of a plan, and `GgufWeights`, the backend that quantizes, caches and
  stitches them into the resident model;
- `llama_cpp`: llama.cpp (llama-cpp-python) as the runtime that scores a file;
- `evaluation`: `autocompress evaluate model.gguf`, the file judged in llama.cpp beside the search's prediction;
- `target`: `GgufTarget`, what the registry hands out for `compression.target: gguf`.
"""
