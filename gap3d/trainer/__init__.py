"""gap3d.trainer"""
