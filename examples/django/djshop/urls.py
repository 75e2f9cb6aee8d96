from django.urls import path, re_path

from flowkeeper.wsgi import django_view

from .views import create_order, show_run
from .workflows import fk

urlpatterns = [
    path("orders", create_order),
    path("runs/<str:run_id>", show_run),
    # flowkeeper's endpoint (invocations, /tick, the dashboard) as a Django view.
    re_path(r"^api/flowkeeper/", django_view(fk)),
]
