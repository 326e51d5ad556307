"""gap3d.inference"""
