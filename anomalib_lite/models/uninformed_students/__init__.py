from anomalib_lite.models.uninformed_students.lightning_model import UninformedStudents
from anomalib_lite.models.uninformed_students.torch_model import UninformedStudentsModel

__all__ = ["UninformedStudents", "UninformedStudentsModel"]
