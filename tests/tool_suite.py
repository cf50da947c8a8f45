"""The tool-call acceptance set (tests/test_tool_calls.py, docs/structured-output.md): 20 customer-service
prompts, each with 2-3 tools, in the OpenAI request shape."""

from __future__ import annotations

from typing import Any


def _tool(name: str, description: str, required: list[str] | None = None, **props: Any) -> dict[str, Any]:
    params = {"type": "object", "properties": props, "required": list(props) if required is None else required}
    return {"type": "function", "function": {"name": name, "description": description, "parameters": params}}


ORDER_ID = {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{4,6}$", "description": "like AB-12345"}
LOOKUP = _tool("lookup_order", "Find an order by its id", order_id=ORDER_ID)
CANCEL = _tool("cancel_order", "Cancel an order", order_id=ORDER_ID,
               reason={"enum": ["changed_mind", "too_late", "wrong_item", "other"]})
TICKET = _tool("open_ticket", "Open a support ticket", ["title", "priority"],
               title={"type": "string", "maxLength": 60}, priority={"enum": ["low", "normal", "urgent"]},
               order_id=ORDER_ID)
WEATHER = _tool("get_weather", "Current weather in a city", ["city"], city={"type": "string", "maxLength": 40},
                unit={"enum": ["celsius", "fahrenheit"]})
BOOK = _tool("book_table", "Reserve a restaurant table", restaurant={"type": "string", "maxLength": 40},
             people={"type": "integer", "minimum": 1, "maximum": 12},
             time={"type": "string", "pattern": "^([01][0-9]|2[0-3]):[0-5][0-9]$"})
CURRENCY = _tool("convert_currency", "Convert an amount between currencies",
                 amount={"type": "number", "minimum": 0, "maximum": 1000000},
                 source={"enum": ["EUR", "USD", "GBP", "JPY", "CHF"]}, target={"enum": ["EUR", "USD", "GBP", "JPY", "CHF"]})
EMAIL = _tool("send_email", "Send an email", to={"type": "string", "format": "email"},
              subject={"type": "string", "maxLength": 60}, body={"type": "string", "maxLength": 200})
REMIND = _tool("set_reminder", "Remind the user later", text={"type": "string", "maxLength": 80},
               minutes={"type": "integer", "minimum": 1, "maximum": 1440})
TRACK = _tool("track_package", "Where a parcel is", tracking={"type": "string", "pattern": "^1Z[0-9A-Z]{8,16}$"})
SEARCH = _tool("search_products", "Search the shop", ["query"], query={"type": "string", "maxLength": 40},
               max_price={"type": "number", "minimum": 0, "maximum": 10000},
               in_stock={"type": "boolean"})
REFUND = _tool("request_refund", "Refund an order", order_id=ORDER_ID,
               amount={"type": "number", "minimum": 0, "maximum": 5000})
ADDRESS = _tool("update_address", "Change the delivery address of an order", order_id=ORDER_ID, address={
    "type": "object", "properties": {"street": {"type": "string", "maxLength": 60},
                                     "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                                     "city": {"type": "string", "maxLength": 40}},
    "required": ["street", "zip", "city"]})

ORDERS, SUPPORT, TRAVEL, SHOP = [LOOKUP, CANCEL, REFUND], [TICKET, EMAIL, ADDRESS], [WEATHER, BOOK, CURRENCY], \
    [SEARCH, TRACK, REMIND]
# five prompts per tool set: requests with the same tools share the tools block, which the prefix cache reuses
CASES: list[tuple[str, list[dict[str, Any]]]] = [
    *[(q, ORDERS) for q in ["Where is my order AB-12345?", "Please cancel order CD-9876, I changed my mind.",
                            "I want my money back for order GH-4321, it cost 59.90.",
                            "Cancel LM-777777, it is taking too long.", "What is the status of order XY-20240?"]],
    *[(q, SUPPORT) for q in ["The app keeps crashing when I pay. This is urgent!",
                             "My package arrived broken, I need help. Order EF-55555.",
                             "Send an email to support@shop.com about my missing invoice.",
                             "Email anna@example.com that the meeting moved to Friday.",
                             "Change the delivery address of order JK-10001 to Hauptstrasse 5, 10115 Berlin."]],
    *[(q, TRAVEL) for q in ["What's the weather like in Paris today?", "Book a table for 4 at Luigi's at 19:30.",
                            "How much is 250 euros in dollars?", "Is it going to rain in Tokyo? Use fahrenheit.",
                            "Convert 1000 yen to pounds please."]],
    *[(q, SHOP) for q in ["Do you have running shoes under 80 dollars?", "Track my parcel 1Z999AA10123456784.",
                          "Find me a kettle that is in stock.", "Remind me in 20 minutes to call the bank.",
                          "Where is parcel 1ZABCDEF12?"]],
]
