"""gap3d.encoders"""
