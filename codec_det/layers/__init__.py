from codec_det.layers.codec_conv import CoDeCConv2d

__all__ = ["CoDeCConv2d"]
