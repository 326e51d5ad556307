"""gap3d.pipeline"""
