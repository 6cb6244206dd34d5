"""prefkit.train"""
