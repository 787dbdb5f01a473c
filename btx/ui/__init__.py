"""Presentation shared by every command: tables that fit the terminal (tables.py), the optional
matplotlib import (pyplot.py), and progress of work in named parts with an ETA (progress.py).
"""
