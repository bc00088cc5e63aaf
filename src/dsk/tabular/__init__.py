"""dsk's table track: an MoE transformer classifier trained, quantized, exported and served on tables.

The stages stay the usual ones; on a table or features artifact they dispatch here:

    $ dsk clean data/sample/breast_cancer.csv --label diagnosis
    $ dsk featurize
    $ dsk pretrain            # a `table-model` artifact: dsk.tabular.model.TableClassifier
    $ dsk quantize --bits 8   # int8 per-channel weights (dsk.tabular.quantize)
    $ dsk export --format onnx  # raw rows in, class probabilities out (dsk.tabular.export)

Library entry points (each imports torch/pandas lazily):
``dsk.tabular.model`` (the network), ``dsk.tabular.preprocess`` (raw rows -> model inputs, numpy
and torch), ``dsk.tabular.train`` (fit with class weights and early stopping on validation AUC),
``dsk.tabular.predict`` (the /v1/predict function), ``dsk.tabular.evaluate`` (metrics on a CSV).
"""
