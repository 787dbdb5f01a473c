"""Training engines behind one protocol (base.py): accelerate for a plain process or DDP, DeepSpeed
for ZeRO 0-3. The loop drives either the same way.
"""
