"""Training code, behind the ``train`` extra (torch, torchvision, onnx).

Never imported by the runtime path.
"""
