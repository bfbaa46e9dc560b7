"""register: the global session store (who is online, on which room instance, bound to which apps).

Redis keys (shared contract, DESIGN.md §4):
  ``pylon:u:{uid}``       HASH  session_id -> ``internal_pb2.Session`` bytes
  ``pylon:r:{instance}``  SET   ``"{uid}\\x00{session_id}"`` of every session registered by that room instance
  ``pylon:register:epoch`` STRING the generation of this data (``epoch.py``): a new value means it was lost
"""
