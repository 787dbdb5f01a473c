"""Presentation shared by every command: tables that fit the terminal (tables.py) and the optional
matplotlib import (pyplot.py).
"""
