"""Pretrained models in and out: the study's MRInets (Keras), SFCN (PyTorch) and pyment's SFCNs
(Keras) imported as workdirs that every command takes as a trained one; export of any trained
workdir to a self-describing folder; several imported models as one ensemble.

`keras_h5` reads Keras weight files with h5py, `sources` knows each published model (what it was
trained with) and converts its weights, `workdir` writes workdirs and export folders.
"""
