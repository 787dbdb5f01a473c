"""Training engines behind one protocol (base.py): accelerate for a plain process or DDP, DeepSpeed
for ZeRO 0-3. The loop drives either the same way. Beside the DeepSpeed engine: zero3_master.py (in
fp32 the ZeRO-3 master partition shares the module's instead of copying it) and host_memory.py
(CPU ZeRO-3 processes hand freed tensors back to the system).
"""
