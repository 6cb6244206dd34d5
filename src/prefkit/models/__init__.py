"""prefkit.models"""
